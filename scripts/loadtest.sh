#!/usr/bin/env bash
# Load tests of rollingpaper on this machine, over loopback only.
#
#   scripts/loadtest.sh                      every scenario below but compare
#   scripts/loadtest.sh classroom idle       the named scenarios only
#   scripts/loadtest.sh compare              rollingpaper and the naive baseline
#                                            (examples/baseline.rs) side by side
#
# Scenarios: classroom, hot-paper, fanout-max, idle, typing-writes, relay, reconnect, compare.
# Builds in release mode, starts its own redis-server (append-only, free port,
# data in a temporary directory) and a fresh server per scenario on a free
# port, pins the server (and Redis) and the load generator to different cores
# when there are at least two, prints one table, and stops everything it
# started. JSON reports stay in $LOADTEST_OUT (default: a temporary directory,
# printed at the end). LOADTEST_SECONDS sets the measured window (default 20;
# compare uses half of it, sweep steps a quarter). LOADTEST_QUICK=1 shortens every window (for a check of
# the script itself, not for numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

usage() {
    cat <<'USAGE'
Usage: scripts/loadtest.sh [SCENARIO...]

Load tests of rollingpaper over loopback: builds in release mode (with the
`load` feature, for rollingpaper-load), starts its own redis-server and a fresh
server per scenario on free ports, prints one table, stops all it started.

Scenarios (default: all but compare):
  classroom      1,000 papers x 30 members, 2 senders each at 5 edits/s, 200 B notes
  hot-paper      1 paper x 1,000 members, 1 sender at 20 edits/s
  fanout-max     10 papers x 50 members, 10 senders: 131,000 deliveries/s, then a sweep
                 up to the rate where p99 passes 50 ms or deliveries are lost
  idle           50,000 connections, one member per paper, nothing sent (memory per connection)
  typing-writes  classroom without warm-up: Redis commands per edit
  relay          10 x 50 on one --cluster node, then on two with members split
  reconnect      500 papers x 20 members, 200 notes of 1 KB each: a graceful restart
                 (--drain-seconds 2, a new server on the same address), every session
                 reconnecting with since, then again without (full snapshots)
  compare        rollingpaper and the naive baseline (examples/baseline.rs) side by side

Environment:
  LOADTEST_SECONDS  measured window in seconds (default 20; compare uses half of it,
                    sweep steps a quarter)
  LOADTEST_QUICK=1  short windows (1 s warm-up, 3 s measured, 2 s drain): a check of
                    the script itself, not numbers to quote
  LOADTEST_SERVER   the server binary to measure (default: this tree's release build), to
                    compare two builds with the same generator
  LOADTEST_OUT      directory for the JSON reports and commands.txt (default: a
                    temporary directory, printed at the end)

Connections are scaled down to the open-file limit (ulimit -n) when it is lower,
and the table says so. For one run with pass/fail thresholds, auth or TLS, call
the generator directly: target/release/rollingpaper-load --help (--min-delivered,
--max-p99-ms, --token-secret, --target wss://HOST:PORT with --ca-file).
USAGE
}

all=(classroom hot-paper fanout-max idle typing-writes relay reconnect)
case "${1:-}" in -h|--help|help) usage; exit 0 ;; esac
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${all[@]}")
for s in "${scenarios[@]}"; do
    case "$s" in
        classroom|hot-paper|fanout-max|idle|typing-writes|relay|reconnect|compare) ;;
        *) echo "loadtest.sh: unknown scenario $s (known: ${all[*]} compare; see --help)" >&2; exit 2 ;;
    esac
done
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v jq >/dev/null || missing+=(jq)
install_packages "${missing[@]}"
command -v cargo >/dev/null || { echo "loadtest.sh: cargo is needed (https://rustup.rs)" >&2; exit 2; }

quick="${LOADTEST_QUICK:-0}"
# Seconds: warm-up, measured window, drain (shortened by LOADTEST_QUICK=1).
if [ "$quick" = 1 ]; then W=1 D=3 R=2; else W=5 D=20 R=5; fi
# LOADTEST_SECONDS sets the measured window (sweep steps take a quarter of it).
D="${LOADTEST_SECONDS:-$D}"

work="$(mktemp -d "${TMPDIR:-/tmp}/rp-loadtest.XXXXXX")"
out="${LOADTEST_OUT:-$work/reports}"
mkdir -p "$out"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work/redis" "$work"/*.log
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- limits and cores -----------------------------------------------------------------

hard="$(ulimit -Hn)"
if [ "$hard" = unlimited ] || [ "$hard" -gt 1048576 ]; then hard=1048576; fi
want=60000
if [ "$hard" -lt "$want" ]; then
    # Root may raise the hard limit itself; elsewhere only the administrator can.
    ulimit -Hn "$want" 2>/dev/null && hard="$want" || \
        echo "loadtest.sh: cannot raise the open-file hard limit above $hard (ulimit -Hn); scenarios are scaled to fit"
fi
ulimit -n "$hard"
# Each connection costs the server one descriptor and the generator another
# (separate processes, each with its own limit); keep some for everything else.
max_conns=$((hard - 256))
echo "loadtest.sh: open-file limit $(ulimit -n), so at most $max_conns connections per scenario"

cores="$(nproc)"
if [ "$cores" -ge 2 ] && command -v taskset >/dev/null; then
    pin_server=(taskset -c 0)
    pin_load=(taskset -c 1)
    server_threads=1
    echo "loadtest.sh: server and redis-server pinned to core 0, load generator to core 1"
else
    pin_server=()
    pin_load=()
    server_threads=0
    echo "loadtest.sh: $cores core(s): nothing pinned, server and generator share the machine"
fi

# ---- build ---------------------------------------------------------------------------

echo "loadtest.sh: building in release mode"
cargo build --release --quiet --features load --bin rollingpaper --bin rollingpaper-load
if printf '%s\n' "${scenarios[@]}" | grep -qx compare; then
    cargo build --release --quiet --example baseline
fi
bin=target/release

# ---- processes -----------------------------------------------------------------------

free_port() {
    local port
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    echo "loadtest.sh: no free port found" >&2
    exit 1
}

redis_port="$(free_port)"
mkdir -p "$work/redis"
"${pin_server[@]}" redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$work/redis" \
    --appendonly yes --save "" --protected-mode no --logfile "$work/redis.log" &
pids+=($!)
for _ in $(seq 100); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
done
redis-cli -p "$redis_port" ping >/dev/null || { echo "loadtest.sh: redis-server did not start" >&2; exit 1; }
redis_url="redis://127.0.0.1:$redis_port"
echo "loadtest.sh: redis-server on 127.0.0.1:$redis_port (append-only), data in $work/redis"

server_pid=""
server_addr=""
# start_server BINARY ARGS...: a fresh server on a free port; sets server_pid, server_addr.
start_server() {
    local log="$work/server.log"
    : >"$log"
    "${pin_server[@]}" "$@" --listen 127.0.0.1:0 --redis "$redis_url" 2>"$log" >/dev/null &
    server_pid=$!
    pids+=("$server_pid")
    for _ in $(seq 200); do
        server_addr="$(grep -o 'listening on http://[0-9.:]*' "$log" | head -1 | sed 's|.*http://||')" || true
        [ -n "$server_addr" ] && return
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "loadtest.sh: the server did not start:" >&2
    cat "$log" >&2
    exit 1
}

stop_server() {
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 200); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
}

# The per-session rate limit (50/s by default) is an abuse control; the sweeps
# go past it on purpose, so it is raised for the measured server.
rollingpaper() {
    start_server "${LOADTEST_SERVER:-$bin/rollingpaper}" --threads "$server_threads" --rate 1000000 --burst 1000000 "$@"
}

# load NAME ARGS...: runs the generator against the running server; the report is $out/NAME.json.
load() {
    local name="$1"
    shift
    echo "loadtest.sh: $name: rollingpaper-load $*" | tee -a "$out/commands.txt"
    "${pin_load[@]}" "$bin/rollingpaper-load" --target "$server_addr" --server-pid "$server_pid" \
        --json "$@" >"$out/$name.json"
}

# ---- the table -----------------------------------------------------------------------

rows="$work/rows.txt"
: >"$rows"
# row NAME NOTE: one line of the table from $out/NAME.json (the sweep's last good step).
row() {
    local name="$1" note="$2"
    jq -r --arg name "$name" --arg note "$note" '
        def f(x; n): if x == null then "-" else (x * pow(10; n) | round / pow(10; n) | tostring) end;
        (.result // {}) as $r |
        [ $name,
          "\(.connections.ok)/\(.connections.planned)",
          f(($r.messages_sent // 0) / ($r.duration_seconds // 1); 0),
          f($r.deliveries_per_second; 0),
          f(($r.delivery_ratio // 0) * 100; 3),
          f($r.latency_ms.p50; 2), f($r.latency_ms.p99; 2), f($r.latency_ms.p99_9; 2), f($r.latency_ms.max; 2),
          f($r.server_cpu_cores; 2), f($r.server_cpu_us_per_delivery; 2),
          f((($r.server_rss_kib // .server_rss_kib_connected) // 0) / 1024; 1),
          f(.server_rss_kib_per_connection; 2),
          f($r.tool_cpu_cores; 2),
          $note ] | @tsv' "$out/$name.json" >>"$rows"
}

# ---- scenarios -----------------------------------------------------------------------

# scaled PAPERS MEMBERS: papers reduced so that PAPERS x MEMBERS fits the limit.
scaled() {
    local papers="$1" members="$2"
    if [ $((papers * members)) -gt "$max_conns" ]; then
        papers=$((max_conns / members))
    fi
    echo "$papers"
}

scale_note() {
    if [ "$1" -ne "$2" ]; then echo "scaled from $2 papers (ulimit -n $hard)"; else echo ""; fi
}

classroom() {
    local papers
    papers="$(scaled 1000 30)"
    rollingpaper
    load classroom --papers "$papers" --members 30 --senders 2 --rate 5 --note-bytes 200 \
        --warmup "$W" --duration "$D" --drain "$R" --connect-concurrency 256
    stop_server
    row classroom "$(scale_note "$papers" 1000)"
}

hot_paper() {
    rollingpaper
    load hot-paper --papers 1 --members 1000 --senders 1 --rate 20 --note-bytes 200 \
        --warmup "$W" --duration "$D" --drain "$R"
    stop_server
    row hot-paper ""
}

fanout_max() {
    # Ten senders per paper keep each session under PROTOCOL.md's default rate
    # limit (50 messages a second) up to 250,000 deliveries a second.
    rollingpaper
    # The reference load of the targets: 10 x 10 senders x 26.2/s x 50 members = 131,000 deliveries/s.
    load fanout-131k --papers 10 --members 50 --senders 10 --rate 26.2 --note-bytes 200 \
        --warmup "$W" --duration "$D" --drain "$R"
    row fanout-131k "fixed at 131,000 deliveries/s offered"
    load fanout-max --papers 10 --members 50 --senders 10 --rate 10 --note-bytes 200 \
        --sweep --sweep-factor 1.25 --sweep-steps 10 --p99-bound-ms 50 \
        --warmup 2 --duration "$((D / 2))" --drain 3
    stop_server
    row fanout-max "$(jq -r '"sweep: last good \(.sweep.last_good_rate // 0 | . * 10 | round / 10)/s per sender; stopped: \(.sweep.stopped_because // "max step")"' "$out/fanout-max.json")"
}

idle() {
    local papers
    papers="$(scaled 50000 1)"
    rollingpaper
    load idle --papers "$papers" --members 1 --senders 0 --duration 5 --connect-concurrency 256
    stop_server
    row idle "$(scale_note "$papers" 50000)"
}

typing_writes() {
    local papers after edits writes
    papers="$(scaled 1000 30)"
    rollingpaper
    redis-cli -p "$redis_port" config resetstat >/dev/null
    # No warm-up: every edit sent is counted, so commands and edits cover the same span.
    load typing-writes --papers "$papers" --members 30 --senders 2 --rate 5 --note-bytes 200 \
        --warmup 0 --duration "$D" --drain "$R"
    # The writer runs behind: a graceful stop writes the whole backlog first.
    stop_server
    after="$(redis-cli -p "$redis_port" info stats | tr -d '\r' | awk -F: '/^total_commands_processed:/ {print $2}')"
    redis-cli -p "$redis_port" info commandstats | tr -d '\r' | grep '^cmdstat' >"$out/typing-writes.commandstats.txt"
    # Every write goes through one script call (EVALSHA) per paper and batch: those
    # are the commands the writer sends; commandstats also counts what the scripts
    # call inside Redis, reported beside.
    writes="$(awk -F'[:=,]' '/^cmdstat_(evalsha|eval):/ {s += $3} END {print s + 0}' "$out/typing-writes.commandstats.txt")"
    edits="$(jq '.result.messages_sent' "$out/typing-writes.json")"
    jq --argjson all "$after" --argjson writes "$writes" --argjson edits "$edits" \
        '. + {redis: {writer_commands: $writes, all_commands_incl_script_calls: $all, edits: $edits,
                      edits_per_writer_command: (if $writes > 0 then $edits / $writes else null end)}}' \
        "$out/typing-writes.json" >"$out/typing-writes.tmp" && mv "$out/typing-writes.tmp" "$out/typing-writes.json"
    row typing-writes "$(jq -r '.redis | "\(.edits) edits, \(.writer_commands) writer commands (\(.all_commands_incl_script_calls) counting calls inside scripts): \(.edits_per_writer_command * 100 | round / 100) edits per command"' "$out/typing-writes.json")$( [ "$papers" -ne 1000 ] && echo "; $(scale_note "$papers" 1000)")"
}

# The original design against rollingpaper: same generator, same shape, papers
# of 10, 50 and 200 notes; one run, side by side.
relay() {
    # The same load on one --cluster node, then on two with each paper's members
    # split between them (every edit crosses through Redis pub/sub).
    local shape=(--papers 10 --members 50 --senders 10 --rate 10 --note-bytes 200 --warmup "$W" --duration "$D" --drain "$R")
    rollingpaper --cluster --node-id solo
    load relay-one-node "${shape[@]}"
    stop_server
    row relay-one-node "one --cluster node"
    rollingpaper --cluster --node-id a
    local a_addr="$server_addr" a_pid="$server_pid"
    rollingpaper --cluster --node-id b
    local b_addr="$server_addr" b_pid="$server_pid"
    server_addr="$a_addr,$b_addr"
    server_pid="$a_pid"
    load relay-two-nodes "${shape[@]}"
    stop_server
    server_pid="$b_pid"
    stop_server
    row relay-two-nodes "two --cluster nodes, members split; server columns are node a's alone"
}

# Every session reconnects after a graceful restart (SIGTERM with
# --drain-seconds, then a new server on the same address): first with since
# (PROTOCOL.md 3.1), then without, on the same papers. The generator says when
# it is ready (every session holds its paper and the last edits); the script
# restarts the server then, and writes the new pid for the generator, which
# reads the new server's start and CPU from /proc.
reconnect() {
    local members=20 notes=200 settle=65 drain=2 papers note addr mode round load_pid log
    papers="$(scaled 500 "$members")"
    note="$(scale_note "$papers" 500)"
    # The fill must be older than the server's resume window (60 s of versions)
    # when the edits are made, or a since snapshot holds it all.
    if [ "$quick" = 1 ]; then papers=20 notes=50 settle=0 note="quick: fill not settled past the resume window"; fi
    local prefix="rc$RANDOM"
    rollingpaper --drain-seconds "$drain"
    addr="$server_addr"
    for mode in on off; do
        round="reconnect-since-$mode"
        rm -f "$work/ready" "$work/new-pid"
        local args=(reconnect --papers "$papers" --members "$members" --notes "$notes" --note-bytes 1024
            --edits 4 --paper-prefix "$prefix" --since "$mode" --connect-concurrency 256)
        # The first round fills the papers; the second finds them in Redis.
        [ "$mode" = on ] && args+=(--fill --settle "$settle")
        echo "loadtest.sh: $round: rollingpaper-load ${args[*]}" | tee -a "$out/commands.txt"
        "${pin_load[@]}" "$bin/rollingpaper-load" "${args[@]}" --target "$addr" --server-pid "$server_pid" \
            --ready-file "$work/ready" --server-pid-file "$work/new-pid" --json >"$out/$round.json" &
        load_pid=$!
        pids+=("$load_pid")
        for _ in $(seq 9000); do
            [ -e "$work/ready" ] && break
            kill -0 "$load_pid" 2>/dev/null || break
            sleep 0.1
        done
        if [ ! -e "$work/ready" ]; then
            echo "loadtest.sh: $round: the generator did not get ready" >&2
            wait "$load_pid" || true
            exit 1
        fi
        stop_server
        log="$work/server.log"
        : >"$log"
        "${pin_server[@]}" "${LOADTEST_SERVER:-$bin/rollingpaper}" --threads "$server_threads" --rate 1000000 \
            --burst 1000000 --drain-seconds "$drain" --listen "$addr" --redis "$redis_url" 2>"$log" >/dev/null &
        server_pid=$!
        pids+=("$server_pid")
        echo "$server_pid" >"$work/new-pid"
        for _ in $(seq 200); do
            grep -q 'listening on' "$log" && break
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.05
        done
        grep -q 'listening on' "$log" || { echo "loadtest.sh: the restarted server did not start:" >&2; cat "$log" >&2; exit 1; }
        wait "$load_pid" || echo "loadtest.sh: $round: the generator exited with status $? (see $out/$round.json)" >&2
        jq -r --arg name "$round" --arg note "$note" '
            def f(x; n): if x == null then "-" else (x * pow(10; n) | round / pow(10; n) | tostring) end;
            .reconnect as $r |
            [ $name, "\($r.ok)/\($r.sessions)", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
              "\($r.snapshots_since) since + \($r.snapshots_full) full snapshots, \(f($r.bytes_until_snapshots / 1048576; 1)) MiB until them (\(f($r.bytes_until_snapshot_per_session; 0)) B each), all in \(f($r.seconds_from_server_start; 2)) s from the new server start, its CPU \(f($r.server_cpu_seconds; 2)) s; check \(.check.matched)/\(.check.papers)\(if $note == "" then "" else "; " + $note end)"
            ] | @tsv' "$out/$round.json" >>"$rows"
    done
    stop_server
    {
        printf 'reconnect\tsessions ok\tsince snapshots\tfull snapshots\tMiB until snapshots\tB per session\ts from server start\tserver CPU s\tretries\tcheck\n'
        for mode in on off; do
            jq -r --arg name "since $mode" '.reconnect as $r | [ $name, "\($r.ok)/\($r.sessions)", $r.snapshots_since,
                $r.snapshots_full, ($r.bytes_until_snapshots / 1048576 * 10 | round / 10),
                $r.bytes_until_snapshot_per_session, $r.seconds_from_server_start, $r.server_cpu_seconds,
                $r.retries, "\(.check.matched)/\(.check.papers)" ] | @tsv' "$out/reconnect-since-$mode.json"
        done
    } | column -t -s $'\t' | tee "$out/reconnect.txt"
}

compare() {
    local notes server
    for notes in 10 50 200; do
        for server in rollingpaper baseline; do
            if [ "$server" = rollingpaper ]; then rollingpaper; else start_server "$bin/examples/baseline"; fi
            load "compare-$server-$notes-fixed" --papers 10 --members 20 --senders 2 --notes "$notes" \
                --rate 2 --note-bytes 200 --warmup 2 --duration "$((D / 2))" --drain "$R"
            row "compare-$server-$notes-fixed" "$notes notes, 2 edits/s per sender"
            load "compare-$server-$notes-max" --papers 10 --members 20 --senders 2 --notes "$notes" \
                --rate 2 --note-bytes 200 --sweep --sweep-factor 2 --sweep-steps 8 --p99-bound-ms 100 \
                --warmup 1 --duration "$((D / 4 > 2 ? D / 4 : 2))" --drain 3
            stop_server
            row "compare-$server-$notes-max" "$(jq -r '"\(.notes) notes, sweep: last good \(.sweep.last_good_rate // 0)/s per sender"' "$out/compare-$server-$notes-max.json")"
        done
    done
}

for s in "${scenarios[@]}"; do
    echo "loadtest.sh: scenario $s"
    case "$s" in
        classroom) classroom ;;
        hot-paper) hot_paper ;;
        fanout-max) fanout_max ;;
        idle) idle ;;
        typing-writes) typing_writes ;;
        relay) relay ;;
        reconnect) reconnect ;;
        compare) compare ;;
    esac
done

echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'); windows ${D}s (warm-up ${W}s)"
{
    printf 'scenario\tconns ok/planned\tedits/s\tdeliveries/s\tdelivered %%\tp50 ms\tp99 ms\tp99.9 ms\tmax ms\tserver cores\tserver us/delivery\tserver RSS MiB\tRSS KiB/conn\ttool cores\tnote\n'
    cat "$rows"
} | column -t -s $'\t'
echo
echo "reports: $out"
