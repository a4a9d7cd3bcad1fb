#!/usr/bin/env bash
# Warm reads through `slapshot chunk get` (one process, one client) against a local fleet
# of 5 nodes: connections each node accepted, and the client's latency summary, for
# HTTP/1.1 and HTTP/2, in constant-work (all) and hedged modes, alternating.
# Usage: benches/read-path-connections.sh [SLAPSHOT_BIN [ROUNDS [READS_PER_RUN]]]
# (defaults: ./target/release/slapshot, 2 rounds, 10240 reads). The fleet, 256 random
# chunks of 512 KiB, and the client run on this machine; figures in docs/PERFORMANCE.md.
set -euo pipefail
BIN=${1:-./target/release/slapshot}
ROUNDS=${2:-2}
READS=${3:-10240}
D=$(mktemp -d /tmp/slapshot-conn.XXXX)
"$BIN" fleet up --nodes 5 --capacity 512MiB --dir "$D/fleet" >/dev/null 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$D"' EXIT
while [ ! -f "$D/fleet/fleet.toml" ]; do sleep 0.1; done
F=$D/fleet/fleet.toml
# 256 chunks of 512 KiB, stored in the fleet (and origin) by `chunk put`.
mkdir -p "$D/chunks"
: > "$D/names"
for i in $(seq 1 256); do
  head -c 524288 /dev/urandom > "$D/chunks/c"
  "$BIN" chunk put --fleet "$F" "$D/chunks/c" >> "$D/names"
done
cp "$F" "$D/h1.toml"
sed 's/^http2 = false/http2 = true/' "$F" > "$D/h2.toml"
# Each run reads the 256 chunks over and over, READS reads in all.
NAMES=()
while [ ${#NAMES[@]} -lt "$READS" ]; do mapfile -t -O ${#NAMES[@]} NAMES < "$D/names"; done
NAMES=("${NAMES[@]:0:$READS}")
accepted() {
  local total=0
  for a in $(grep '^addr' "$F" | cut -d'"' -f2); do
    v=$(curl -s "http://$a/metrics" | awk '/^slapshot_http_connections_accepted_total /{print $2}')
    total=$((total + v))
  done
  echo "$total"
}
# One warm-up pass, so that the memory tiers are as warm for every run.
"$BIN" chunk get --fleet "$F" --concurrency 8 "${NAMES[@]:0:256}" >/dev/null
for round in $(seq 1 "$ROUNDS"); do
  for proto in h1 h2; do
    for mode in all hedged; do
      before=$(accepted)
      summary=$("$BIN" chunk get --fleet "$D/$proto.toml" --read-mode $mode \
        --concurrency 8 --metrics "${NAMES[@]}" 2>&1 >/dev/null | grep -E '^(chunk reads|read latency)|drained_responses_total [0-9]|connections_opened_total\{' | tr '\n' ' ')
      after=$(accepted)
      # Each scrape is one connection per node: 5 of the difference are `accepted` itself.
      echo "round $round $proto $mode: nodes accepted $((after - before - 5)) connections; $summary"
    done
  done
done
