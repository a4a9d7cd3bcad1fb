#!/usr/bin/env bash
# Builds slapshot-server, starts one node on loopback with a throw-away store, and shows
# the shard API with curl: PUT, GET (HTTP/1.1 and HTTP/2), HEAD, DELETE, /health and a few
# metrics. Stops the node (SIGTERM) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p slapshot-server
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

./target/release/slapshot-server --data-dir "$work/data" --capacity 512MiB --listen 127.0.0.1:0 \
    --addr-file "$work/addr" 2>"$work/log" &
pid=$!
for _ in $(seq 100); do [ -s "$work/addr" ] && break; sleep 0.05; done
addr=$(cat "$work/addr")
echo "node listening on http://$addr (log: $work/log)"

head -c 131072 /dev/urandom >"$work/shard"
crc=$(python3 -c 'import sys,zlib; print(zlib.crc32(open(sys.argv[1],"rb").read()))' "$work/shard")
set -x
curl -sS -o /dev/null -w 'PUT    -> %{http_code}\n' -X PUT -H "x-slapshot-crc32: $crc" --data-binary @"$work/shard" "http://$addr/v1/shards/demo-chunk.0"
curl -sS -o "$work/back" -w 'GET    -> %{http_code}, %{size_download} bytes\n' "http://$addr/v1/shards/demo-chunk.0"
cmp "$work/shard" "$work/back"
curl -sS -o /dev/null -w 'GET h2 -> %{http_code}, HTTP/%{http_version}\n' --http2-prior-knowledge "http://$addr/v1/shards/demo-chunk.0"
curl -sS -I "http://$addr/v1/shards/demo-chunk.0"
curl -sS -o /dev/null -w 'DELETE -> %{http_code}\n' -X DELETE "http://$addr/v1/shards/demo-chunk.0"
curl -sS -o /dev/null -w 'GET    -> %{http_code} after delete\n' "http://$addr/v1/shards/demo-chunk.0"
curl -sS "http://$addr/health"
curl -sS "http://$addr/metrics" | grep -E '^slapshot_(http_requests_total|cache_|flash_capacity|memory_capacity)'
set +x
kill -TERM "$pid"
wait "$pid"
echo "node stopped cleanly"
