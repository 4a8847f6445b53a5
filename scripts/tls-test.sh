#!/usr/bin/env bash
# End to end behind a TLS terminator: a throw-away self-signed certificate, two
# nodes sharing one redis-server, nginx in front of them with scripts/nginx.conf,
# and real wss:// clients (Node's ws) on the same paper seeing each
# other's edits; the load generator through it over wss:// (every delivery
# arrives with --ca-file; without it, the certificate is refused at once); then
# what the file promises operators: /papers refused publicly and served
# internally, /api, /metrics and /readyz refused by nginx itself on both (each
# node serves them on its own address), http redirected to https, HSTS, no
# token in the access log, and a node killed and restarted on its address
# being used again at once. Everything runs on free loopback ports and is stopped on exit.
# Installs nginx, openssl, Node and the system's CA roots if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# The system's CA roots: what the load generator trusts without --ca-file.
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
install_packages "${missing[@]}"
nginx=$(command -v nginx || echo /usr/sbin/nginx)
if [ ! -d scripts/interop/node_modules/ws ]; then
    npm ci --prefix scripts/interop --no-audit --no-fund --silent
fi
cargo build --quiet --bin rollingpaper
cargo build --quiet --features load --bin rollingpaper-load

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A certificate for 127.0.0.1, valid for a day. CA:FALSE: a server's own
# certificate (openssl makes a CA one by default, which rustls refuses to see
# served as a server's).
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=127.0.0.1" \
    -addext "subjectAltName=IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

redis_port=$(free_port)
mkdir -p "$work/redis"
redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$work/redis" --appendonly yes --save "" >/dev/null &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

# Starts a node and sets $addr to where it listens (no subshell: its pid must
# reach the cleanup list).
start_node() {
    local log=$1 id=$2 listen=${3:-127.0.0.1:0}
    addr=""
    ./target/debug/rollingpaper --listen "$listen" --threads 2 --redis "redis://127.0.0.1:$redis_port" \
        --cluster --node-id "$id" --trusted-proxies 127.0.0.1 2>"$log" &
    pids+=($!)
    node_pid=$!
    for _ in $(seq 200); do
        addr=$(sed -n 's|.*listening on http://\([0-9.:]*\).*|\1|p' "$log")
        [ -n "$addr" ] && return 0
        sleep 0.1
    done
    echo "tls-test.sh: a node did not start:" >&2; cat "$log" >&2; return 1
}
start_node "$work/a.log" a
node_a=$addr
node_a_pid=$node_pid
start_node "$work/b.log" b
node_b=$addr

https_port=$(free_port)
http_port=$(free_port)
internal_port=$(free_port)
# The lines nginx.conf marks CHANGE, with this test's values.
sed -e "s|server 127.0.0.1:8081 |server $node_a |" -e "s|server 127.0.0.1:8082 |server $node_b |" \
    -e "s|listen 443 ssl;|listen 127.0.0.1:$https_port ssl;|" -e "s|listen 80;|listen 127.0.0.1:$http_port;|" \
    -e "s|listen 127.0.0.1:9180;|listen 127.0.0.1:$internal_port;|" \
    -e "s|server_name paper.example;|server_name 127.0.0.1;|" \
    -e "s|/etc/letsencrypt/live/paper.example/fullchain.pem|$work/cert.pem|" \
    -e "s|/etc/letsencrypt/live/paper.example/privkey.pem|$work/key.pem|" \
    -e "s|/var/log/nginx/rollingpaper.access.log|$work/access.log|" \
    scripts/nginx.conf > "$work/site.conf"
if grep -n 'CHANGE' "$work/site.conf" | grep -E '8081|8082|paper\.example|/etc/letsencrypt|/var/log|listen (80|443 )'; then
    echo "tls-test.sh: a CHANGE line of nginx.conf was not replaced (above)" >&2; exit 1
fi
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $work/body;
    proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi;
    uwsgi_temp_path $work/uwsgi;
    scgi_temp_path $work/scgi;
    include $work/site.conf;
}
CONF
"$nginx" -p "$work" -c "$work/nginx.conf" -t -q
"$nginx" -p "$work" -c "$work/nginx.conf"
for _ in $(seq 100); do
    curl -s --cacert "$work/cert.pem" "https://127.0.0.1:$https_port/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done

status=0
# check WHAT EXPECTED ACTUAL: one line per failed expectation.
check() {
    if [ "$2" != "$3" ]; then echo "tls-test.sh: $1: expected $2, got $3" >&2; status=1; fi
}
timeout 60 node scripts/interop/wss_client.mjs "wss://127.0.0.1:$https_port" "$work/cert.pem" || status=1

# The load generator over wss://: a short run trusting the certificate through
# --ca-file, where every delivery must arrive (--min-delivered 0.999: exit 3
# otherwise), and its report must show deliveries.
load=(./target/debug/rollingpaper-load --target "wss://127.0.0.1:$https_port" --quiet --json
    --connect-timeout 10 --connect-deadline 20)
load_status=0
timeout 60 "${load[@]}" --ca-file "$work/cert.pem" --papers 3 --members 4 --senders 2 --rate 10 \
    --warmup 1 --duration 3 --drain 3 --min-delivered 0.999 >"$work/load.json" 2>"$work/load.err" || load_status=$?
# Connections open and deliveries received, from the report: "12 N", N above 0.
delivered=$(python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(r["connections"]["ok"], (r["result"] or {}).get("deliveries_received", 0))' "$work/load.json" 2>/dev/null ||
    echo "no report")
status_before_load=$status
check "rollingpaper-load over wss://: exit status" 0 "$load_status"
case "$delivered" in
    "12 "[1-9]*) ;;
    *) check "rollingpaper-load over wss://: connections open, deliveries received" "12 and more than 0" "$delivered" ;;
esac
[ "$status" = "$status_before_load" ] || cat "$work/load.err" "$work/load.json" >&2 || true
# Without --ca-file the system's roots do not hold the self-signed certificate:
# the run must stop at once with exit status 1 and say which host and why.
untrusted_status=0
started=$SECONDS
timeout 30 "${load[@]}" --papers 2 --members 2 --duration 3 >"$work/untrusted.json" 2>"$work/untrusted.err" \
    || untrusted_status=$?
check "rollingpaper-load with an untrusted certificate: exit status" 1 "$untrusted_status"
if [ $((SECONDS - started)) -gt 10 ]; then
    check "rollingpaper-load with an untrusted certificate: seconds to fail" "10 at most" "$((SECONDS - started))"
fi
refused="TLS with 127.0.0.1:$https_port: the server's certificate is refused (invalid peer certificate: UnknownIssuer)"
if ! grep -qF "$refused" "$work/untrusted.err"; then
    check "rollingpaper-load with an untrusted certificate: message" "$refused ..." "$(cat "$work/untrusted.err")"
fi

health=$(curl -s --cacert "$work/cert.pem" "https://127.0.0.1:$https_port/healthz" || true)
[ "$health" = "ok" ] || { echo "tls-test.sh: /healthz over https said: $health" >&2; status=1; }

code() { curl -s -o /dev/null -w '%{http_code}' --cacert "$work/cert.pem" "$@" || true; }
# nginx's own 404 (its page names nginx), not a node's (`not found`): the
# request never reached a node.
nginx_404() {
    local body
    body=$(curl -s -w ' %{http_code}' --cacert "$work/cert.pem" "$1" | tr '\r\n' '  ' || true)
    case "$body" in *"<center>nginx"*" 404") echo "404 from nginx" ;; *) echo "${body: -3}: ${body:0:60}" ;; esac
}
# /papers is refused publicly and served on the internal listener; /api,
# /metrics and /readyz are refused on both: each node serves them on its own
# --internal-listen address (here, without it, on its main port).
for path in /metrics /readyz /papers/p1 /api/papers/p1/presence /api/openapi.json; do
    check "public $path" "404 from nginx" "$(nginx_404 "https://127.0.0.1:$https_port$path")"
done
for path in /metrics /readyz /api/papers/p1/presence /api/openapi.json; do
    check "internal $path" "404 from nginx" "$(nginx_404 "http://127.0.0.1:$internal_port$path")"
done
check "internal /papers/p1" 200 "$(code "http://127.0.0.1:$internal_port/papers/p1")"
check "/metrics of node b at its own address" 200 "$(code "http://$node_b/metrics")"
# Plain http only redirects, to https.
check "http redirect" 301 "$(code "http://127.0.0.1:$http_port/ws/p1")"
location=$(curl -s -o /dev/null -w '%{redirect_url}' "http://127.0.0.1:$http_port/ws/p1?x=1" || true)
case "$location" in https://*/ws/p1\?x=1) ;; *) check "redirect target" "https://.../ws/p1?x=1" "$location" ;; esac
hsts=$(curl -s -D - -o /dev/null --cacert "$work/cert.pem" "https://127.0.0.1:$https_port/healthz" | tr -d '\r' \
    | sed -n 's/^[Ss]trict-[Tt]ransport-[Ss]ecurity: //p')
check "HSTS header" "max-age=63072000" "$hsts"
# A token in the query string never reaches the access log.
secret_token="tls-test-token-$RANDOM$RANDOM"
code "https://127.0.0.1:$https_port/ws/p1?token=$secret_token" >/dev/null
code "http://127.0.0.1:$http_port/ws/p1?token=$secret_token" >/dev/null
for _ in $(seq 50); do grep -q ' /ws/p1 ' "$work/access.log" 2>/dev/null && break; sleep 0.1; done
grep -q ' /ws/p1 ' "$work/access.log" || { echo "tls-test.sh: the access log has no /ws/p1 line" >&2; status=1; }
if grep -q "$secret_token" "$work/access.log"; then
    echo "tls-test.sh: the access log holds the token:" >&2; grep "$secret_token" "$work/access.log" >&2; status=1
fi
# A node killed and started again on its address is used again at once: nginx
# must not hold it as failed (it would, for a WebSocket upstream, until one of
# the node's sessions ends), and meanwhile its papers go to the other node.
node_of() { timeout 30 node scripts/interop/wss_node_of.mjs "wss://127.0.0.1:$https_port" "$work/cert.pem" "$1" || true; }
paper_a=""
for i in $(seq 0 31); do
    case "$(node_of "restart-$i")" in *-a) paper_a="restart-$i"; break ;; esac
done
if [ -z "$paper_a" ]; then
    check "a paper served by node a" "one of restart-0..31" "none"
else
    kill -9 "$node_a_pid"
    wait "$node_a_pid" 2>/dev/null || true
    check "$paper_a while node a is down: served by" "b" "$(node_of "$paper_a" | sed 's/.*-//')"
    start_node "$work/a2.log" a "$node_a"
    for _ in $(seq 100); do [ "$(curl -s "http://$node_a/healthz")" = ok ] && break; sleep 0.1; done
    check "$paper_a once node a is back: served by" "a" "$(node_of "$paper_a" | sed 's/.*-//')"
fi

if [ "$status" -ne 0 ]; then
    echo "--- nginx" >&2; cat "$work/nginx-error.log" >&2 || true
    echo "--- node a" >&2; tail -20 "$work/a.log" >&2
    echo "--- node b" >&2; tail -20 "$work/b.log" >&2
fi
echo "tls-test: $((1 - status)) passed, $status failed"
exit "$status"
