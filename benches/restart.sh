#!/usr/bin/env bash
# Restart time of a full store: after SIGTERM (the index checkpoint is written and loaded)
# against after kill -9 (the whole device is scanned), alternating, ROUNDS times each.
# The store (CAPACITY, default 4GiB, in a data directory under STORE_DIR, default
# /var/tmp) is first filled with 128 KiB shards by wrk. Prints, per restart, the time from
# starting the process to serving (the address file appears), the node's own recovery
# time (slapshot_recovery_duration_seconds) and the shards recovered.
#
# Needs wrk and curl. Usage: benches/restart.sh [ROUNDS, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
capacity=${CAPACITY:-4GiB}
command -v wrk >/dev/null || { echo "needs wrk" >&2; exit 1; }
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked -p slapshot-server >&2
bin=${CARGO_TARGET_DIR:-target}/release/slapshot-server
work=$(mktemp -d "${STORE_DIR:-/var/tmp}/restart.XXXXXX")
pid=
cleanup() {
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start() {
    rm -f "$work/addr"
    local t0
    t0=$(date +%s.%N)
    "$bin" --data-dir "$work/store" --capacity "$capacity" --threads 2 --memory 0 \
        --listen 127.0.0.1:0 --addr-file "$work/addr" --log warn >>"$work/node.log" 2>&1 &
    pid=$!
    while [ ! -s "$work/addr" ]; do sleep 0.01; done
    started=$(echo "$(date +%s.%N) - $t0" | bc)
    url="http://$(cat "$work/addr")"
}
metric() { curl -s "$url/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

cat >"$work/put.lua" <<'LUA'
local threads = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
local body = string.rep("s", 131072)
local n = 0
request = function()
    n = n + 1
    return wrk.format("PUT", "/v1/shards/fill-" .. id .. "-" .. n, nil, body)
end
LUA

start
echo "formatting and filling a $capacity store with 128 KiB shards..."
capacity_bytes=$(metric slapshot_flash_capacity_bytes)
while true; do
    wrk -t2 -c16 -d5s -s "$work/put.lua" "$url" >/dev/null
    used=$(metric slapshot_flash_bytes_used)
    evicted=$(metric slapshot_flash_evicted_regions_total)
    [ "${evicted%.*}" -gt 0 ] && break
    echo "  $((used >> 20)) MiB of $((capacity_bytes >> 20)) MiB"
done
echo "full: $(metric slapshot_flash_shards) shards, $(( $(metric slapshot_flash_bytes_used) >> 20 )) MiB"

for _ in $(seq "$rounds"); do
    for how in SIGTERM kill-9; do
        if [ "$how" = SIGTERM ]; then
            kill -TERM "$pid"
            t0=$(date +%s.%N)
            wait "$pid" || true
            stopped=$(echo "$(date +%s.%N) - $t0" | bc)
        else
            kill -9 "$pid"
            wait "$pid" 2>/dev/null || true
            stopped=0
        fi
        start
        printf "after %-7s stop %5.2f s, start to serving %6.2f s, recovery %6.3f s, shards %s, from checkpoint %s\n" \
            "$how" "$stopped" "$started" "$(metric slapshot_recovery_duration_seconds)" \
            "$(metric slapshot_recovered_shards)" "$(metric slapshot_recovery_from_checkpoint)"
    done
done
