#!/usr/bin/env bash
# PUT latency and throughput of slapshot-server over loopback, driven by wrk with unique
# keys (every PUT creates a shard; once the store is full, eviction runs beside the PUTs).
#
# For each configuration (a label and the node's flags) it runs:
#   - 1 connection, 1 thread: the latency of one PUT at a time (p50, p99, p99.99);
#   - 32 connections, 2 threads: concurrent PUTs, throughput and tail
# (CONNECTIONS="1 4 32" adds other loads).
# Configurations are run in ROUNDS alternating rounds on fresh stores, and the medians of
# the rounds are printed, because two busy processes share the cores and runs are noisy.
#
# Usage: benches/put-latency.sh [SECONDS per run, default 10] [ROUNDS, default 3]
# Configurations come from CONFIGS, one per line, "label|binary|flags"; the default
# compares the durability modes of the binary built from this tree.
# STORE_DIR (default: a temporary directory under /var/tmp) must be on the filesystem
# whose durability is being measured; tmpfs would measure nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
rounds=${2:-3}
shard_size=${SHARD_SIZE:-131072}
# Concurrent connections per load (wrk uses up to 2 threads).
CONNECTIONS=${CONNECTIONS:-1 32}

command -v wrk >/dev/null || {
    echo "needs wrk: apt-get install wrk" >&2
    exit 1
}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked -p slapshot-server >&2
bin=${CARGO_TARGET_DIR:-target}/release/slapshot-server
CONFIGS=${CONFIGS:-"none|$bin|--durability none
group|$bin|--durability group
dsync|$bin|--durability dsync"}

work=$(mktemp -d "${STORE_DIR:-/var/tmp}/put-latency.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/put.lua" <<LUA
local threads = 0
function setup(thread)
    thread:set("id", threads)
    threads = threads + 1
end
local body = string.rep("s", $shard_size)
local n = 0
request = function()
    n = n + 1
    return wrk.format("PUT", "/v1/shards/put-" .. id .. "-" .. n .. "-" .. os.time(), nil, body)
end
done = function(summary, latency, requests)
    io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
        latency:percentile(50), latency:percentile(99), latency:percentile(99.99),
        summary.errors.status))
end
LUA

# run LABEL BINARY FLAGS: one round of both loads on a fresh store.
run() {
    local label=$1 binary=$2 flags=$3
    rm -rf "$work/store" "$work/addr"
    # shellcheck disable=SC2086
    "$binary" --data-dir "$work/store" --capacity 2GiB --threads 2 --listen 127.0.0.1:0 \
        --addr-file "$work/addr" --log warn $flags >"$work/node.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 600); do [ -s "$work/addr" ] && break; sleep 0.05; done
    local url
    url="http://$(cat "$work/addr")"
    for c in $CONNECTIONS; do
        local t=$((c < 2 ? c : 2))
        local line
        line=$(wrk -t"$t" -c"$c" -d"${duration}s" -s "$work/put.lua" "$url" | grep '^RESULT')
        read -r _ requests micros p50 p99 p9999 bad <<<"$line"
        awk -v l="$label" -v c="$c" -v r="$requests" -v us="$micros" -v p50="$p50" \
            -v p99="$p99" -v p4="$p9999" -v bad="$bad" -v size="$shard_size" 'BEGIN {
            s = us / 1e6
            printf "%-10s c=%-3d %8.0f PUT/s %6.2f GB/s  p50 %8.1f us  p99 %8.1f us  p99.99 %8.1f us  non-2xx %d\n",
                l, c, r / s, r * size / s / 1e9, p50, p99, p4, bad
            printf "%s|%d|%f|%f|%f|%f\n", l, c, r / s, p50, p99, p4 >> "'"$work/results"'"
        }'
    done
    # With --durability group: how many acknowledgements each fdatasync served.
    curl -s "$url/metrics" | awk -v l="$label" '
        /^slapshot_flash_flushes_total / { f = $2 }
        /^slapshot_flash_flush_waiters_total / { w = $2 }
        END { if (f > 0) printf "%-10s %d fdatasyncs for %d waiters, %.2f per flush\n", l, f, w, w / f }'
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

echo "machine: $(nproc) cores, kernel $(uname -r), store on $(df --output=source,fstype "$work" | tail -1)"
echo "load: $shard_size-byte PUTs with unique keys, ${duration}s per run, $rounds rounds"
for _ in $(seq "$rounds"); do
    while IFS='|' read -r label binary flags; do
        [ -n "$label" ] && run "$label" "$binary" "$flags"
    done <<<"$CONFIGS"
done

# median LABEL CONNECTIONS COLUMN
median() {
    awk -F'|' -v l="$1" -v c="$2" '$1 == l && $2 == c' "$work/results" | cut -d'|' -f"$3" | sort -g |
        awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
echo "medians over $rounds rounds (the paper's server-side PUT median is 125 us):"
while IFS='|' read -r label _ _; do
    [ -n "$label" ] || continue
    for c in $CONNECTIONS; do
        printf "%-10s c=%-3d %8.0f PUT/s  p50 %8.1f us  p99 %8.1f us  p99.99 %8.1f us\n" "$label" "$c" \
            "$(median "$label" "$c" 3)" "$(median "$label" "$c" 4)" "$(median "$label" "$c" 5)" "$(median "$label" "$c" 6)"
    done
done <<<"$CONFIGS"
