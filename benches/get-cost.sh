#!/usr/bin/env bash
# What one 128 KiB GET costs: nginx against slapshot-server, from the memory tier and from
# flash (--memory 0), with the same 1,000 shards, random keys, wrk -t2 -c32, servers
# measured one after the other in ROUNDS alternating rounds (medians printed):
#   - CPU microseconds per GET: the server's user+system time over the run (all its
#     threads, and nginx's master and workers) divided by the requests served;
#   - req/s and p99;
#   - flash only: GB/s against fio on the same store file (O_DIRECT 132 KiB random reads,
#     io_uring, depth 32), alternating, since this virtual disk varies between runs;
# then, in one pass per server under strace -c -f (which slows everything; counts only):
#   - system calls per GET, and mmap/munmap/madvise per GET.
# BASELINE_BIN=path adds the build before this tree's as "before" rows.
#
# Needs nginx, wrk, fio and strace (Debian: apt-get install nginx-light wrk fio strace).
# Usage: benches/get-cost.sh [SECONDS per run, default 10] [ROUNDS, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
rounds=${2:-3}
shards=1000
shard_size=131072
for tool in nginx wrk fio strace; do
    command -v $tool >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked -p slapshot-server >&2
bin=${CARGO_TARGET_DIR:-target}/release/slapshot-server
work=$(mktemp -d /var/tmp/get-cost.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/www/v1/shards"
for i in $(seq 0 $((shards - 1))); do
    head -c $shard_size /dev/urandom >"$work/www/v1/shards/shard-$i"
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
        listen 127.0.0.1:18081 reuseport;
        root $work/www;
    }
}
NGINX
cat >"$work/random.lua" <<LUA
math.randomseed(os.time())
request = function()
    return wrk.format("GET", "/v1/shards/shard-" .. math.random(0, $((shards - 1))))
end
done = function(summary, latency, requests)
    io.write(string.format("RESULT %d %d %d %d %d\n", summary.requests, summary.bytes,
        summary.duration, latency:percentile(99), summary.errors.status))
end
LUA

nginx -c "$work/nginx.conf" -g 'daemon off;' &
nginx_master=$!
pids+=("$nginx_master")
sleep 1
nginx_pids="$nginx_master $(pgrep -P "$nginx_master" | tr '\n' ' ')"

# start_node NAME BINARY FLAGS...: a node with the shards uploaded; its pid in $work/NAME.pid.
start_node() {
    local name=$1 binary=$2; shift 2
    "$binary" --data-dir "$work/$name" --capacity 2GiB --threads 2 --listen 127.0.0.1:0 \
        --addr-file "$work/$name.addr" --log warn "$@" >"$work/$name.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    echo "$pid" >"$work/$name.pid"
    for _ in $(seq 600); do [ -s "$work/$name.addr" ] && break; sleep 0.05; done
    local addr
    addr=$(cat "$work/$name.addr")
    for i in $(seq 0 $((shards - 1))); do
        echo "url = \"http://$addr/v1/shards/shard-$i\""
        echo "upload-file = \"$work/www/v1/shards/shard-$i\""
    done >"$work/$name.curl"
    curl -sS --fail --no-progress-meter --parallel --parallel-max 16 -K "$work/$name.curl" -o /dev/null
}
servers=()
add_server() { servers+=("$1"); }
start_node memory "$bin" --memory 1GiB && add_server memory
start_node flash "$bin" --memory 0 && add_server flash
if [ -n "${BASELINE_BIN:-}" ]; then
    start_node memory-before "$BASELINE_BIN" --memory 1GiB && add_server memory-before
    start_node flash-before "$BASELINE_BIN" --memory 0 && add_server flash-before
fi

url_of() { [ "$1" = nginx ] && echo "http://127.0.0.1:18081" || echo "http://$(cat "$work/$1.addr")"; }
pids_of() { [ "$1" = nginx ] && echo "$nginx_pids" || cat "$work/$1.pid"; }
# CPU ticks (1/100 s) used so far by a set of processes, all threads.
ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }

# measure NAME: one timed wrk run; appends "NAME|req/s|p99 ms|cpu us per GET|GB/s".
measure() {
    local name=$1 url pidset
    url=$(url_of "$name")
    pidset=$(pids_of "$name")
    wrk -t2 -c32 -d2s -s "$work/random.lua" "$url" >/dev/null
    local before after line
    before=$(ticks "$pidset")
    line=$(wrk -t2 -c32 -d"${duration}s" -s "$work/random.lua" "$url" | grep '^RESULT')
    after=$(ticks "$pidset")
    read -r _ requests bytes micros p99 bad <<<"$line"
    awk -v n="$name" -v r="$requests" -v b="$bytes" -v us="$micros" -v p99="$p99" -v t=$((after - before)) -v bad="$bad" 'BEGIN {
        s = us / 1e6
        printf "%-16s %8.0f req/s %5.2f GB/s  p99 %7.2f ms  CPU %6.1f us/GET  non-2xx %d\n", n, r / s, b / s / 1e9, p99 / 1000, t * 10000 / r, bad
        printf "%s|%f|%f|%f|%f\n", n, r / s, p99 / 1000, t * 10000 / r, b / s / 1e9 >> "'"$work/results"'"
    }'
}

fio_run() {
    local gbs
    gbs=$(fio --name=r --filename="$work/flash/shards.slap" --rw=randread --bs=132k --direct=1 \
        --ioengine=io_uring --iodepth=32 --size=160M --runtime="$duration" --time_based \
        --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{ printf "%.3f", $7 * 1024 / 1e9 }')
    printf "%-16s %33s GB/s\n" fio "$gbs"
    echo "fio|0|0|0|$gbs" >>"$work/results"
}

echo "machine: $(nproc) cores, kernel $(uname -r); wrk -t2 -c32, ${duration}s runs, $rounds rounds"
for _ in $(seq "$rounds"); do
    measure nginx
    for s in "${servers[@]}"; do measure "$s"; done
    fio_run
done

median() {
    grep "^$1|" "$work/results" | cut -d'|' -f"$2" | sort -g |
        awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
echo "medians over $rounds rounds:"
for s in nginx "${servers[@]}"; do
    printf "%-16s %8.0f req/s  p99 %7.2f ms  CPU %6.1f us/GET  %5.2f GB/s\n" "$s" \
        "$(median "$s" 2)" "$(median "$s" 3)" "$(median "$s" 4)" "$(median "$s" 5)"
done
printf "%-16s %5.2f GB/s\n" fio "$(median fio 5)"

# syscalls NAME: system calls per GET under strace -c -f (3 s of load).
syscalls() {
    local name=$1 url attach=()
    url=$(url_of "$name")
    for p in $(pids_of "$name"); do attach+=(-p "$p"); done
    strace -c -f -o "$work/strace-$name" "${attach[@]}" &
    local tracer=$!
    sleep 1
    local line
    line=$(wrk -t2 -c32 -d3s -s "$work/random.lua" "$url" | grep '^RESULT')
    kill -INT "$tracer"
    wait "$tracer" 2>/dev/null || true
    read -r _ requests _ <<<"$line"
    awk -v n="$name" -v r="$requests" '
        $NF == "total" { total = $4 }
        $NF == "mmap" { mmap = $4 } $NF == "munmap" { munmap = $4 } $NF == "madvise" { madvise = $4 }
        END { printf "%-16s %6.2f syscalls/GET   mmap %.3f  munmap %.3f  madvise %.3f per GET\n", n, total / r, mmap / r, munmap / r, madvise / r }' "$work/strace-$name"
}
echo "under strace -c -f (counts per GET; the traced run is slower):"
syscalls nginx
for s in "${servers[@]}"; do syscalls "$s"; done
