#!/usr/bin/env bash
# Load tests of rollingpaper on this machine, over loopback only.
#
#   scripts/loadtest.sh                      every scenario below but compare
#   scripts/loadtest.sh classroom idle       the named scenarios only
#   scripts/loadtest.sh compare              rollingpaper and the naive baseline
#                                            (examples/baseline.rs) side by side
#
# Scenarios: classroom, hot-paper, fanout-max, idle, typing-writes, relay, reconnect, abuse, api, compare.
# Builds in release mode, starts its own redis-server (append-only, free port,
# data in a temporary directory; for relay also a three-master Redis Cluster)
# and a fresh server per scenario on a free port, pins the server (and Redis)
# and the load generator to different cores when there are at least two,
# prints one table, and stops everything it started. JSON reports stay in
# $LOADTEST_OUT (default: a temporary directory, printed at the end).
# LOADTEST_SECONDS sets the measured window (default 20; compare uses half of
# it, sweep steps a quarter). LOADTEST_QUICK=1 shortens every window (for a
# check of the script itself, not for numbers).
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
  relay          10 x 50 on one --cluster node, then on two with members split; the
                 two-node load again on a three-master Redis Cluster (redis+cluster://,
                 started here), then 100 x 10 (2 senders, 20 notes) at 1,000 and 4,000
                 edits/s on two nodes over one Redis and over the Cluster: Redis CPU
                 per process (single, or each shard), per edit, Redis memory per paper
  reconnect      500 papers x 20 members, 200 notes of 1 KB each: a graceful restart
                 (--drain-seconds 2, a new server on the same address), every session
                 reconnecting with since, then again without (full snapshots)
  abuse          hostile clients within every limit (null-field patch churn, max-size notes
                 and many-field patches, delete storms of fresh ids, ping floods: 2 sessions
                 each; 4 waves of 300 joiners of a 200 x 16 KB paper that never read; 200
                 request heads at a byte a second) against one node with the default limits
                 and its own redis-server (rollingpaper-load abuse --help),
                 while 4 papers x 5 honest members edit (2 senders each at 2 edits/s); reports
                 over time and as a table: Redis PING p50/p99 (every 100 ms, its own
                 connection), honest edit-to-saved p50/p99, server RSS, backlog, Redis
                 used_memory. Fails (exit 1, after the tables) unless Redis PING p99 < 50 ms,
                 saved p99 < 250 ms, and RSS and used_memory are flat over the second half
                 (the last quarter's max <= 1.10 x the third quarter's max + 16 MiB)
  api            backend API writes against one node (PUT of notes, one connection per
                 request, N writers back to back: 0, 1, 4, 16 and 64) while 20 papers x 10
                 members edit the same papers over WebSocket (every member at 2 edits/s):
                 API writes/s and their latency p50/p99/max beside the members'
                 edit-to-saved p50/p99/max (rollingpaper-load api --help)
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
  LOADTEST_ABUSE_KINDS  the hostile kinds abuse runs, comma-separated (default: all of
                    churn,wide,deletes,pings,joiners,heads), to see each one's share;
                    gets (waves of unread GET /papers replies of the large paper) runs
                    only when named here

Connections are scaled down to the open-file limit (ulimit -n) when it is lower,
and the table says so. For one run with pass/fail thresholds, auth or TLS, call
the generator directly: target/release/rollingpaper-load --help (--min-delivered,
--max-p99-ms, --token-secret, --target wss://HOST:PORT with --ca-file).
USAGE
}

all=(classroom hot-paper fanout-max idle typing-writes relay reconnect abuse api)
case "${1:-}" in -h|--help|help) usage; exit 0 ;; esac
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${all[@]}")
for s in "${scenarios[@]}"; do
    case "$s" in
        classroom|hot-paper|fanout-max|idle|typing-writes|relay|reconnect|abuse|api|compare) ;;
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
    local live
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    # A redis-server inside a long script does not stop on SIGTERM (abuse on a
    # build without bounded calls): five seconds, then SIGKILL.
    for _ in $(seq 50); do
        live=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && live=1; done
        [ "$live" = 0 ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work/redis" "$work/redis-abuse" "$work/cluster" "$work"/*.log
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
redis_pid="${pids[-1]}"
echo "loadtest.sh: redis-server on 127.0.0.1:$redis_port (append-only), data in $work/redis"
# The Redis the servers use: this one, or the Cluster's URL (relay).
server_redis="$redis_url"

cluster_ports=()
cluster_pids=()
# start_redis_cluster: three redis-server --cluster-enabled masters on free
# loopback ports (each with its own directory, append-only), joined with
# redis-cli --cluster create, no replicas; sets cluster_ports, cluster_pids.
start_redis_cluster() {
    local ports=() port i taken
    # Three client ports and three bus ports, all different.
    for _ in $(seq 100); do
        [ ${#ports[@]} -ge 6 ] && break
        port="$(free_port)"
        taken=0
        for i in "${ports[@]}"; do [ "$i" = "$port" ] && taken=1; done
        [ "$port" = "$redis_port" ] && taken=1
        [ "$taken" = 0 ] && ports+=("$port")
    done
    [ ${#ports[@]} -ge 6 ] || { echo "loadtest.sh: no free ports for the Redis Cluster" >&2; exit 1; }
    for i in 0 1 2; do
        mkdir -p "$work/cluster/$i"
        # The bus port is given: the default (port + 10000) may be taken or past 65535.
        "${pin_server[@]}" redis-server --bind 127.0.0.1 --port "${ports[$i]}" --dir "$work/cluster/$i" \
            --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port "${ports[$((i + 3))]}" \
            --appendonly yes --save "" --protected-mode no --logfile "$work/cluster-$i.log" &
        pids+=($!)
        cluster_pids+=($!)
        cluster_ports+=("${ports[$i]}")
    done
    for port in "${cluster_ports[@]}"; do
        for _ in $(seq 100); do
            redis-cli -p "$port" ping >/dev/null 2>&1 && break
            sleep 0.1
        done
        redis-cli -p "$port" ping >/dev/null || { echo "loadtest.sh: cluster node on $port did not start" >&2; exit 1; }
    done
    local hosts=()
    for port in "${cluster_ports[@]}"; do hosts+=("127.0.0.1:$port"); done
    if ! timeout 60 redis-cli --cluster create "${hosts[@]}" --cluster-replicas 0 --cluster-yes \
        </dev/null >"$work/cluster-create.log" 2>&1; then
        echo "loadtest.sh: redis-cli --cluster create failed:" >&2
        cat "$work/cluster-create.log" >&2
        exit 1
    fi
    local ok
    for _ in $(seq 300); do
        ok=0
        for port in "${cluster_ports[@]}"; do
            redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && ok=$((ok + 1))
        done
        [ "$ok" = 3 ] && break
        sleep 0.1
    done
    [ "$ok" = 3 ] || { echo "loadtest.sh: the Redis Cluster did not reach cluster_state:ok" >&2; exit 1; }
    cluster_url="redis+cluster://$(IFS=,; echo "${hosts[*]}")"
    echo "loadtest.sh: Redis Cluster of three masters on ${hosts[*]} (append-only, no replicas), data in $work/cluster"
}

# redis_cpu PORT: the CPU seconds (system + user, all threads) the Redis on PORT has used (INFO cpu).
redis_cpu() {
    redis-cli -p "$1" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.6f\n", s}'
}

# paper_memory PORT PREFIX: the bytes the keys of papers PREFIX-* take in the
# Redis on PORT (MEMORY USAGE with every element counted, summed).
paper_memory() {
    redis-cli -p "$1" --scan --pattern "rp:paper:{$2-*}*" | awk '{print "MEMORY USAGE " $0 " SAMPLES 0"}' |
        redis-cli -p "$1" | awk '{s += $1} END {print s + 0}'
}

server_pid=""
server_addr=""
# start_server BINARY ARGS...: a fresh server on a free port; sets server_pid, server_addr.
start_server() {
    local log="$work/server.log"
    : >"$log"
    "${pin_server[@]}" "$@" --listen 127.0.0.1:0 --redis "$server_redis" 2>"$log" >/dev/null &
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

# Other processes the generator measures over its windows (NAME=PID, --watch-pid).
watch=()
# load NAME ARGS...: runs the generator against the running server; the report is $out/NAME.json.
load() {
    local name="$1" w
    shift
    local args=("$@")
    for w in "${watch[@]}"; do args+=(--watch-pid "$w"); done
    echo "loadtest.sh: $name: rollingpaper-load ${args[*]}" | tee -a "$out/commands.txt"
    "${pin_load[@]}" "$bin/rollingpaper-load" --target "$server_addr" --server-pid "$server_pid" \
        --json "${args[@]}" >"$out/$name.json"
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

# relay_run NAME REDIS NODES NOTE ARGS...: the generator's load (ARGS) on NODES
# (1 or 2) --cluster nodes, members split between two; REDIS is "one" (the
# script's redis-server) or "cluster" (the three masters). Every Redis process
# is measured over the generator's window (--watch-pid), with node b; after the
# nodes stop, a SCAN of each Redis process finds the papers it holds and what
# their keys take (MEMORY USAGE).
relay_run() {
    local name="$1" setup="$2" nodes="$3" note="$4" prefix
    shift 4
    local ports=() pids_r=() labels=() i memory=() papers_on=()
    prefix="rl$RANDOM$RANDOM"
    if [ "$setup" = one ]; then
        ports=("$redis_port") pids_r=("$redis_pid") labels=(redis)
        server_redis="$redis_url"
    else
        ports=("${cluster_ports[@]}") pids_r=("${cluster_pids[@]}") labels=(shard-1 shard-2 shard-3)
        server_redis="$cluster_url"
    fi
    watch=()
    for i in "${!ports[@]}"; do
        watch+=("${labels[$i]}=${pids_r[$i]}")
    done
    rollingpaper --cluster --node-id "$name-a"
    local a_addr="$server_addr" a_pid="$server_pid" b_pid=""
    if [ "$nodes" = 2 ]; then
        rollingpaper --cluster --node-id "$name-b"
        b_pid="$server_pid"
        server_addr="$a_addr,$server_addr"
        server_pid="$a_pid"
        watch+=("node-b=$b_pid")
    fi
    load "$name" "$@" --paper-prefix "$prefix"
    stop_server
    if [ -n "$b_pid" ]; then server_pid="$b_pid"; stop_server; fi
    watch=()
    server_redis="$redis_url"
    for i in "${!ports[@]}"; do
        memory+=("$(paper_memory "${ports[$i]}" "$prefix")")
        papers_on+=("$(redis-cli -p "${ports[$i]}" --scan --pattern "rp:paper:{$prefix-*}:notes" | wc -l)")
    done
    local labels_json memory_json papers_json
    labels_json="$(printf '%s\n' "${labels[@]}" | jq -R . | jq -s -c .)"
    memory_json="$(printf '%s\n' "${memory[@]}" | jq -s -c .)"
    papers_json="$(printf '%s\n' "${papers_on[@]}" | jq -s -c .)"
    jq --arg setup "$setup" --argjson nodes "$nodes" --argjson labels "$labels_json" \
        --argjson memory "$memory_json" --argjson papers_on "$papers_json" \
        --argjson idle "$(jq -c --arg setup "$setup" '.[$setup]' "$work/redis-idle.json")" '
        (.result // {}) as $r |
        [ $labels[] as $l | $r.watched[$l].cpu_seconds // 0 ] as $cpu |
        ($cpu | add) as $total |
        ($r.messages_sent // 0) as $edits |
        . + {redis: {
            setup: $setup, nodes: $nodes, processes: $labels, cpu_seconds: $cpu, cpu_seconds_total: $total,
            edits: $edits, deliveries: ($r.deliveries_received // 0),
            cpu_us_per_edit: (if $edits > 0 then $total * 1e6 / $edits else null end),
            busiest_cpu_us_per_edit: (if $edits > 0 then ($cpu | max) * 1e6 / $edits else null end),
            cpu_us_per_delivery: (if ($r.deliveries_received // 0) > 0 then $total * 1e6 / $r.deliveries_received else null end),
            idle_cpu_ms_per_second: $idle,
            papers_on: $papers_on,
            paper_key_bytes: $memory,
            memory_bytes_per_paper: (if ($papers_on | add) > 0 then ($memory | add) / ($papers_on | add) else null end),
            node_b_cpu_cores: $r.watched["node-b"].cpu_cores }}' \
        "$out/$name.json" >"$out/$name.tmp" && mv "$out/$name.tmp" "$out/$name.json"
    row "$name" "$note; $(jq -r '
        def f(x; n): if x == null then "-" else (x * pow(10; n) | round / pow(10; n) | tostring) end;
        .redis as $d |
        (if $d.setup == "one" then "redis CPU: \(f($d.cpu_seconds[0]; 2)) s"
         else "shards: \($d.cpu_seconds | map(f(.; 2)) | join(" / ")) s (papers \($d.papers_on | map(tostring) | join("/")))" end)
        + ", \(f($d.cpu_us_per_edit; 1)) us per edit"
        + (if $d.node_b_cpu_cores == null then "" else "; node b \(f($d.node_b_cpu_cores; 2)) cores" end)' "$out/$name.json")"
}

# The same load on one --cluster node, then on two with each paper's members
# split between them (every edit crosses through Redis pub/sub), over one
# Redis; then the two-node load over a three-master Redis Cluster. 10 papers
# hash unevenly over three shards, so a second shape with ten times more
# papers (the same 1,000 edits/s, 10 a paper instead of 100) runs over one
# Redis and over the Cluster, side by side, and again at four times the rate
# (Redis's CPU per edit falls as the writer's pipelines fill).
relay() {
    local few=(--papers 10 --members 50 --senders 10 --rate 10 --note-bytes 200 --warmup "$W" --duration "$D" --drain "$R")
    local many=(--papers 100 --members 10 --senders 2 --notes 20 --note-bytes 200 --warmup "$W" --duration "$D" --drain "$R")
    [ ${#cluster_ports[@]} -gt 0 ] || start_redis_cluster
    # Idle CPU of every Redis process (no server connected), for the reader to
    # weigh the windows' figures: ms of CPU a second, from INFO cpu.
    local idle=$((W > 1 ? W : 1)) t0=() t1=() port
    for port in "$redis_port" "${cluster_ports[@]}"; do t0+=("$(redis_cpu "$port")"); done
    sleep "$idle"
    for port in "$redis_port" "${cluster_ports[@]}"; do t1+=("$(redis_cpu "$port")"); done
    jq -n -c --argjson t0 "[$(IFS=,; echo "${t0[*]}")]" --argjson t1 "[$(IFS=,; echo "${t1[*]}")]" --argjson s "$idle" \
        '[$t1, $t0] | transpose | map((.[0] - .[1]) * 1000 / $s) | {one: .[0:1], cluster: .[1:4]}' \
        >"$work/redis-idle.json"
    relay_run relay-one-node one 1 "one --cluster node, one Redis" "${few[@]}"
    relay_run relay-two-nodes one 2 "two --cluster nodes, members split, one Redis; server columns are node a's" "${few[@]}"
    relay_run relay-two-nodes-cluster cluster 2 "the same on a three-master Redis Cluster" "${few[@]}"
    relay_run relay-many-one one 2 "100 x 10, two nodes, one Redis" "${many[@]}" --rate 5
    relay_run relay-many-cluster cluster 2 "100 x 10, two nodes, Redis Cluster" "${many[@]}" --rate 5
    relay_run relay-busy-one one 2 "100 x 10 at 4,000 edits/s, two nodes, one Redis" "${many[@]}" --rate 20
    relay_run relay-busy-cluster cluster 2 "100 x 10 at 4,000 edits/s, two nodes, Redis Cluster" "${many[@]}" --rate 20
    local name
    {
        printf 'relay\tRedis\tpapers x members\tedits\tdelivered %%\tp99 ms\tRedis CPU s (each)\tsum s\tus per edit (sum)\tus per edit (busiest)\tpapers (each)\tB per paper\tidle ms/s (each)\tnode a / b cores\n'
        for name in relay-one-node relay-two-nodes relay-two-nodes-cluster relay-many-one relay-many-cluster \
            relay-busy-one relay-busy-cluster; do
            jq -r --arg name "$name" '
                def f(x; n): if x == null then "-" else (x * pow(10; n) | round / pow(10; n) | tostring) end;
                .redis as $d | (.result // {}) as $r |
                [ $name, (if $d.setup == "one" then "one" else "3 shards" end), "\(.papers) x \(.members)",
                  "\($d.edits) (\(f($d.edits / ($r.duration_seconds // 1); 0))/s)", f(($r.delivery_ratio // 0) * 100; 3), f($r.latency_ms.p99; 2),
                  ($d.cpu_seconds | map(f(.; 2)) | join(" / ")), f($d.cpu_seconds_total; 2),
                  f($d.cpu_us_per_edit; 1), f($d.busiest_cpu_us_per_edit; 1),
                  ($d.papers_on | map(tostring) | join(" / ")), f($d.memory_bytes_per_paper; 0),
                  ($d.idle_cpu_ms_per_second | map(f(.; 2)) | join(" / ")),
                  "\(f($r.server_cpu_cores; 2)) / \(f($d.node_b_cpu_cores; 2))" ] | @tsv' "$out/$name.json"
        done
    } | column -t -s $'\t' | tee "$out/relay.txt"
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

# The original design against rollingpaper: same generator, same shape, papers
# of 10, 50 and 200 notes; one run, side by side.
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

# Backend API writes (PROTOCOL.md 7) against one node while members edit the
# same papers: 20 papers x 10 members, every member sending an upsert of its
# own note at 2 a second (400 edits/s), and 0, 1, 4, 16 then 64 API writers,
# each sending its next PUT once the last is answered, on a connection of its
# own (the server keeps none alive). One server for the five runs, each run on
# papers of its own. The generator reports API writes per second and their
# latency (connect to the whole answer), beside the members' edit-to-saved.
api() {
    local key writers name counts=(0 1 4 16 64)
    [ "$quick" = 1 ] && counts=(0 4)
    # A key for this run only, on loopback.
    key="loadtest-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    rollingpaper --api-key "$key"
    for writers in "${counts[@]}"; do
        name="api-$writers"
        local args=(api --papers 20 --members 10 --senders 10 --rate 2 --note-bytes 200 --writers "$writers"
            --warmup "$W" --duration "$D" --drain "$R")
        echo "loadtest.sh: $name: rollingpaper-load ${args[*]}" | tee -a "$out/commands.txt"
        LOAD_API_KEY="$key" "${pin_load[@]}" "$bin/rollingpaper-load" "${args[@]}" --target "$server_addr" \
            --server-pid "$server_pid" --watch-pid "redis=$redis_pid" --json >"$out/$name.json" ||
            echo "loadtest.sh: $name: the generator exited with status $? (see $out/$name.json)" >&2
        jq -r --arg name "$name" '
            def f(x; n): if x == null then "-" else (x * pow(10; n) | round / pow(10; n) | tostring) end;
            [ $name, "\(.members_joined)/\(.papers * .members)", f(.edits.per_second; 0), "-", "-",
              f(.edits.saved_ms.p50; 2), f(.edits.saved_ms.p99; 2), "-", f(.edits.saved_ms.max; 2),
              f(.server.cpu_cores; 2), "-", f((.server.rss_kib // 0) / 1024; 1), "-", f(.tool_cpu_cores; 2),
              "member edit-to-saved in the columns; \(.writers) API writers: \(f(.api.per_second; 0)) writes/s, p50 \(f(.api.latency_ms.p50; 2)) / p99 \(f(.api.latency_ms.p99; 2)) / max \(f(.api.latency_ms.max; 2)) ms" ] | @tsv' \
            "$out/$name.json" >>"$rows"
    done
    stop_server
    {
        printf 'api (20 x 10 members at 2 edits/s)\tAPI writers\tAPI writes/s\tAPI p50 ms\tAPI p99 ms\tAPI max ms\tAPI not 200\tedits/s\tedit-to-saved p50 ms\tp99 ms\tmax ms\tunsaved\tserver cores\tRedis cores\tgenerator cores\n'
        for writers in "${counts[@]}"; do
            jq -r --arg name "api-$writers" '
                def f(x; n): if x == null then "-" else (x * pow(10; n) | round / pow(10; n) | tostring) end;
                [ $name, .writers, f(.api.per_second; 0), f(.api.latency_ms.p50; 2), f(.api.latency_ms.p99; 2),
                  f(.api.latency_ms.max; 2), (.api.answered - .api.ok), f(.edits.per_second; 0),
                  f(.edits.saved_ms.p50; 2), f(.edits.saved_ms.p99; 2), f(.edits.saved_ms.max; 2), .edits.unsaved,
                  f(.server.cpu_cores; 2), f(.watched.redis.cpu_cores; 2), f(.tool_cpu_cores; 2) ] | @tsv' \
                "$out/api-$writers.json"
        done
    } | column -t -s $'\t' | tee "$out/api.txt"
}

# Why the abuse scenario failed, if it did: reported after the tables, exit 1.
abuse_failed=""

# Hostile clients within every limit against one node (issue 24, PROTOCOL.md
# 1.2), with the server's default limits (rate 50/s, bursts of 200, 16 KiB
# notes) and a redis-server of its own, so that what they do to Redis is
# measured alone and nothing later shares a Redis that may be stuck in a
# script. The generator samples Redis from outside the server (PING every
# 100 ms, INFO memory every second) and judges the thresholds (exit 3); the
# tables are printed either way.
abuse() {
    local port dir rpid status=0 args=()
    port="$(free_port)"
    dir="$work/redis-abuse"
    mkdir -p "$dir"
    "${pin_server[@]}" redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" \
        --appendonly yes --save "" --protected-mode no --logfile "$work/redis-abuse.log" &
    rpid=$!
    pids+=("$rpid")
    for _ in $(seq 100); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    if ! redis-cli -p "$port" ping >/dev/null; then
        echo "loadtest.sh: abuse: redis-server did not start:" >&2
        cat "$work/redis-abuse.log" >&2 || true
        exit 1
    fi
    server_redis="redis://127.0.0.1:$port"
    start_server "${LOADTEST_SERVER:-$bin/rollingpaper}" --threads "$server_threads"
    server_redis="$redis_url"
    # Rows of 5 s over a long window, of 1 s over a short one.
    args=(abuse --duration "$D" --drain "$R" --interval "$((D >= 20 ? 5 : 1))")
    # Quick: fewer joiners, a smaller paper and fewer heads (a check of the script).
    [ "$quick" = 1 ] && args+=(--joiners 30 --large-notes 20 --heads 20)
    [ -z "${LOADTEST_ABUSE_KINDS:-}" ] || args+=(--kinds "$LOADTEST_ABUSE_KINDS")
    echo "loadtest.sh: abuse: rollingpaper-load ${args[*]}" | tee -a "$out/commands.txt"
    "${pin_load[@]}" "$bin/rollingpaper-load" "${args[@]}" --target "$server_addr" --server-pid "$server_pid" \
        --redis "127.0.0.1:$port" --json >"$out/abuse.json" || status=$?
    stop_server
    cp "$work/server.log" "$out/abuse-server.log" 2>/dev/null || true
    # A Redis stuck in a script ignores SIGTERM until the script ends.
    kill -TERM "$rpid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$rpid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$rpid" 2>/dev/null || true
    wait "$rpid" 2>/dev/null || true
    if [ ! -s "$out/abuse.json" ]; then
        abuse_failed="the generator exited with status $status and no report"
        return
    fi
    {
        printf 'abuse over time\tphase\tRedis PING p50 ms\tp99 ms\tPINGs not PONG (BUSY)\tsaved p50 ms\tsaved p99 ms\tsaved\tunsaved (sent then)\tserver cores\tserver RSS MiB\tbacklog\tbacklog bytes\tRedis used_memory MiB\thealthz ms\n'
        jq -r '
            def f(x): if x == null then "-" else (x | tostring) end;
            .timeline[] | [ "\(.from)-\(.to) s", .phase, f(.redis_ping_ms.p50), f(.redis_ping_ms.p99),
              "\(.redis_ping_failed) (\(.redis_ping_busy))", f(.saved_ms.p50), f(.saved_ms.p99), f(.saved_ms.n),
              f(.unsaved_sent), f(.server_cpu_cores), f(.server_rss_mib), f(.backlog), f(.backlog_bytes), f(.redis_used_memory_mib),
              f(.healthz_ms) ] | @tsv' "$out/abuse.json"
    } | column -t -s $'\t' | tee "$out/abuse-timeline.txt"
    echo
    {
        printf 'abuse (window %s s)\tmeasured\tthreshold\tverdict\n' "$D"
        jq -r '
            def f(x): if x == null then "-" else (x | tostring) end;
            def ok(b): if b then "pass" else "FAIL" end;
            .summary as $s | .thresholds as $t |
            ( [ "Redis PING p50 / p99 ms", "\(f($s.redis_ping_ms.p50)) / \(f($s.redis_ping_ms.p99)) (\($s.redis_ping_failed) of \($s.redis_ping_ms.n) not PONG, \($s.redis_ping_busy) BUSY)",
               "p99 < \($t.max_ping_p99_ms)", ok(($s.redis_ping_ms.p99 // 1e9) < $t.max_ping_p99_ms) ],
             [ "honest edit-to-saved p50 / p99 ms", "\(f($s.saved_ms.p50)) / \(f($s.saved_ms.p99)) (\($s.honest_unsaved) of \($s.honest_edits) edits never saved)",
               "p99 < \($t.max_saved_p99_ms)", ok(($s.saved_ms.p99 // 1e9) < $t.max_saved_p99_ms) ],
             [ "server RSS MiB, 3rd / 4th quarter max", "\(f($s.server_rss.q3_max_mib)) / \(f($s.server_rss.q4_max_mib))",
               "4th <= \(f($s.server_rss.bound_mib))", ok($s.server_rss.flat) ],
             [ "Redis used_memory MiB, 3rd / 4th quarter max", "\(f($s.redis_used_memory.q3_max_mib)) / \(f($s.redis_used_memory.q4_max_mib)) (\($s.used_memory_unread) samples unread)",
               "4th <= \(f($s.redis_used_memory.bound_mib))", ok($s.redis_used_memory.flat) ],
             [ "backlog max (ops)", f($s.backlog_max.rollingpaper_backlog), "-", "-" ],
             [ "backlog max (bytes)", f($s.backlog_max.rollingpaper_backlog_bytes), "-", "-" ],
             [ "/healthz p99 ms (another address)", "\(f($s.healthz_ms.p99)) (\($s.healthz_failed) failed)", "-", "-" ]
            ) | @tsv' "$out/abuse.json"
    } | column -t -s $'\t' | tee "$out/abuse.txt"
    jq -r '.hostile | to_entries[] | "loadtest.sh: abuse: hostile \(.key): sent \(.value.sent), opened \(.value.opened), failed \(.value.failed), \(.value.events)"' "$out/abuse.json"
    jq -r --arg d "$D" '
        def f(x): if x == null then "-" else (x | tostring) end;
        .summary as $s |
        [ "abuse", "-", "-", "-", "-", f($s.saved_ms.p50), f($s.saved_ms.p99), "-", f($s.saved_ms.max), "-", "-",
          f($s.server_rss.q4_max_mib), "-", "-",
          "honest edit-to-saved in the columns; Redis PING p99 \(f($s.redis_ping_ms.p99)) ms; thresholds \(if .thresholds.passed then "passed" else "MISSED" end)" ] | @tsv' \
        "$out/abuse.json" >>"$rows"
    case "$status" in
        0) ;;
        3) abuse_failed="thresholds missed: $(jq -r '.thresholds.missed | join("; ")' "$out/abuse.json")" ;;
        *) abuse_failed="the generator exited with status $status (see $out/abuse.json)" ;;
    esac
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
        abuse) abuse ;;
        api) api ;;
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
if [ -n "$abuse_failed" ]; then
    echo "loadtest.sh: abuse FAILED: $abuse_failed" >&2
    exit 1
fi
