#!/usr/bin/env bash
# slapshot-server against nginx, serving the same 1,000 shards of 128 KiB over loopback,
# both driven by wrk (2 threads, 32 keep-alive connections, random keys) for the same time,
# one after the other in one run:
#   1. nginx: 2 workers, sendfile, keep-alive, files in the page cache;
#   2. slapshot-server, warm: every GET served from the memory tier (native HTTP/1.1 engine);
#   3. the same with --http1 hyper, the hyper engine;
#   4. slapshot-server with --memory 0: every GET an O_DIRECT read from flash through io_uring.
# Prints req/s, GB/s, p50 and p99 for each run. Two busy servers and wrk share the cores,
# so single runs are noisy: nginx and the memory tier are measured in ROUNDS alternating
# rounds and compared by their medians.
#
# Needs nginx and wrk (Debian: apt-get install nginx-light wrk). Not part of the test suite.
# Usage: benches/server-vs-nginx.sh [SECONDS per run, default 15] [ROUNDS, default 3]
# Extra slapshot-server flags can be passed in NODE_FLAGS, e.g. NODE_FLAGS="--pin-threads off".
# DRIVER=loadgen drives the same runs with slapshot-loadgen (closed loop, the same 32
# connections) instead of wrk; with RATE=R as well, an open loop at R requests a second,
# which compares latency at one fixed load rather than at each server's saturation.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-15}
rounds=${2:-3}
shards=1000
shard_size=131072
threads=2
connections=32

driver=${DRIVER:-wrk}
command -v nginx >/dev/null && command -v wrk >/dev/null || {
    echo "needs nginx and wrk: apt-get install nginx-light wrk" >&2
    exit 1
}
cargo build --release --locked -p slapshot-server -p slapshot-loadgen >&2
work=$(mktemp -d)
# nginx workers run as nobody and must be able to read the files.
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The same bytes for both servers.
mkdir -p "$work/www/v1/shards"
# Keys as slapshot-loadgen names them: lg-00000000, lg-00000001, ...
key() { printf 'lg-%08d' "$1"; }
for i in $(seq 0 $((shards - 1))); do
    head -c $shard_size /dev/urandom >"$work/www/v1/shards/$(key "$i")"
done

cat >"$work/nginx.conf" <<NGINX
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:18080 reuseport;
        root $work/www;
    }
}
NGINX

cat >"$work/random.lua" <<LUA
math.randomseed(os.time())
request = function()
    return wrk.format("GET", string.format("/v1/shards/lg-%08d", math.random(0, $((shards - 1)))))
end
done = function(summary, latency, requests)
    io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.bytes,
        summary.duration, latency:percentile(50), latency:percentile(99), summary.errors.status))
end
LUA

# run NAME URL: warm up for 3 s, then measure; prints one row.
run() {
    if [ "$driver" = loadgen ]; then run_loadgen "$@"; return; fi
    local name=$1 url=$2
    wrk -t$threads -c$connections -d3s -s "$work/random.lua" "$url" >/dev/null
    local line
    line=$(wrk -t$threads -c$connections -d"${duration}s" -s "$work/random.lua" "$url" | grep '^RESULT')
    read -r _ requests bytes micros p50 p99 bad <<<"$line"
    awk -v n="$name" -v r="$requests" -v b="$bytes" -v us="$micros" -v p50="$p50" -v p99="$p99" -v bad="$bad" 'BEGIN {
        s = us / 1e6
        printf "%-26s %9.0f req/s %6.2f GB/s   p50 %7.3f ms   p99 %7.3f ms   non-2xx %d\n", n, r / s, b / s / 1e9, p50 / 1000, p99 / 1000, bad
        printf "%s|%f|%f\n", n, r / s, p99 / 1000 >> "'"$work/results"'"
    }'
}

# run_loadgen NAME URL: the same with slapshot-loadgen's JSON report.
run_loadgen() {
    local name=$1 url=$2 mode=(--connections "$connections")
    [ -n "${RATE:-}" ] && mode+=(--rate "$RATE")
    ./target/release/slapshot-loadgen shards --target "$url" --keys $shards --size $shard_size \
        "${mode[@]}" --duration 3s --json >/dev/null
    ./target/release/slapshot-loadgen shards --target "$url" --keys $shards --size $shard_size \
        "${mode[@]}" --duration "${duration}s" --json >"$work/report.json"
    python3 - "$name" "$work/report.json" "$work/results" <<'PY'
import json, sys
name, report, results = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
rps, gbps = report["requests_per_second"], report["bytes_per_second"] / 1e9
p50, p99, p999 = (report[k] / 1000 for k in ("p50_us", "p99_us", "p999_us"))
print(f"{name:<26} {rps:9.0f} req/s {gbps:6.2f} GB/s   p50 {p50:7.3f} ms   p99 {p99:7.3f} ms   "
      f"p99.9 {p999:7.3f} ms   errors {report['errors']}")
with open(results, "a") as f:
    f.write(f"{name}|{rps}|{p99}\n")
PY
}

nginx -c "$work/nginx.conf" -g 'daemon off;' &
pids+=($!)

# start_node NAME FLAGS...: starts a node, uploads the shards to it, leaves its address in
# $work/NAME.addr.
start_node() {
    local name=$1; shift
    ./target/release/slapshot-server --data-dir "$work/$name" --capacity 2GiB --threads 2 \
        --listen 127.0.0.1:0 --addr-file "$work/$name.addr" --log warn ${NODE_FLAGS:-} "$@" >"$work/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 200); do [ -s "$work/$name.addr" ] && break; sleep 0.05; done
    local addr
    addr=$(cat "$work/$name.addr")
    for i in $(seq 0 $((shards - 1))); do
        echo "url = \"http://$addr/v1/shards/$(key "$i")\""
        echo "upload-file = \"$work/www/v1/shards/$(key "$i")\""
    done >"$work/$name.curl"
    curl -sS --fail --no-progress-meter --parallel --parallel-max 16 -K "$work/$name.curl" -o /dev/null
}
start_node memory --memory 1GiB
start_node hyper --memory 1GiB --http1 hyper
start_node flash --memory 0
memory_addr=$(cat "$work/memory.addr")
hyper_addr=$(cat "$work/hyper.addr")
flash_addr=$(cat "$work/flash.addr")
sleep 1

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
if [ "$driver" = loadgen ]; then
    echo "load: slapshot-loadgen shards --connections $connections ${RATE:+--rate $RATE }--duration ${duration}s, $shards random keys of $shard_size bytes, $rounds rounds"
else
    echo "load: wrk -t$threads -c$connections -d${duration}s, $shards random keys of $shard_size bytes, $rounds rounds"
fi
for _ in $(seq "$rounds"); do
    run "nginx (sendfile)" "http://127.0.0.1:18080"
    run "slapshot-server (memory)" "http://$memory_addr"
    run "slapshot (memory, hyper)" "http://$hyper_addr"
done
run "slapshot-server (flash)" "http://$flash_addr"

# median NAME COLUMN: median over the rounds of one column of the results.
median() {
    grep "^$1|" "$work/results" | cut -d'|' -f"$2" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
nginx_rps=$(median "nginx (sendfile)" 2)
nginx_p99=$(median "nginx (sendfile)" 3)
echo "medians over $rounds rounds:"
for name in "nginx (sendfile)" "slapshot-server (memory)" "slapshot (memory, hyper)" "slapshot-server (flash)"; do
    rps=$(median "$name" 2)
    p99=$(median "$name" 3)
    awk -v n="$name" -v r="$rps" -v p="$p99" -v br="$nginx_rps" -v bp="$nginx_p99" 'BEGIN {
        printf "%-26s %9.0f req/s  p99 %7.3f ms   throughput %.2fx nginx, p99 %.2fx nginx\n", n, r, p, r / br, p / bp
    }'
done
