#!/usr/bin/env bash
# Shows what reaches the block device for each acknowledged PUT and DELETE, per
# --durability mode: the node stores on a loop device (write-back cache, no FUA, like the
# virtio disk of this machine), and perf records
#   - block:block_rq_issue on that device: data writes (W), FUA writes (W with F after
#     it), and cache flushes (F as the operation), as the block layer issues them;
#   - io_uring:io_uring_submit_req from the node: the write and fsync operations it asks for.
# Then it divides the counts by the number of requests. Device-mapper (dm-log-writes,
# dm-flakey) would let a test replay or drop unflushed writes, but this kernel has no
# device-mapper driver, so the flags the node issues are the strongest check available.
#
# Needs root (losetup, perf with tracepoints) and python3. Not part of the test suite.
# Usage: benches/trace-flushes.sh [REQUESTS per pass, default 200]
# BASELINE_BIN=path also traces an older binary (without --durability) first.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-200}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked -p slapshot-server >&2
bin=${CARGO_TARGET_DIR:-target}/release/slapshot-server
work=$(mktemp -d /var/tmp/trace-flushes.XXXXXX)
loop=
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt"
    [ -n "$loop" ] && losetup -d "$loop" || true
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s 1G "$work/backing"
loop=$(losetup --find --show "$work/backing")
devno=$(lsblk -dno MAJ:MIN "$loop" | tr -d ' ' | tr : ,)
echo "device: $loop ($devno), write cache: $(cat /sys/block/"$(basename "$loop")"/queue/write_cache), fua: $(cat /sys/block/"$(basename "$loop")"/queue/fua)"

cat >"$work/client.py" <<'PY'
import http.client, sys
addr, method, count, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
host, port = addr.rsplit(":", 1)
conn = http.client.HTTPConnection(host, int(port))
body = b"s" * 131072
for i in range(count):
    conn.request(method, f"/v1/shards/{prefix}-{i}", body=body if method == "PUT" else None)
    response = conn.getresponse()
    response.read()
    assert response.status in (201, 204), (method, response.status)
PY

# pass MODE METHOD PREFIX: one traced pass of REQUESTS sequential requests.
pass() {
    local mode=$1 method=$2 prefix=$3
    perf record -q -e block:block_rq_issue -e io_uring:io_uring_submit_req -a -o "$work/perf.data" \
        -- python3 "$work/client.py" "$(cat "$work/addr")" "$method" "$requests" "$prefix" 2>/dev/null
    perf script -i "$work/perf.data" 2>/dev/null >"$work/trace"
    [ -z "${KEEP_TRACE:-}" ] || cp "$work/trace" "/tmp/trace-$mode-$method"
    awk -v dev="$devno" -v n="$requests" -v mode="$mode" -v method="$method" '
        /block:block_rq_issue/ {
            for (i = 1; i <= NF; i++) if ($i == dev) { rwbs = $(i + 1); break }
            if (i > NF) next
            if (rwbs ~ /^F*F[^W]*$/ && rwbs !~ /W/) flush++
            else if (rwbs ~ /W/) { write++; if (rwbs ~ /WF/) fua++; if (rwbs ~ /^FW/) preflush++; if (rwbs ~ /M/) meta++ }
        }
        /io_uring:io_uring_submit_req/ && /slapshot-core/ {
            if ($0 ~ /opcode (WRITE|WRITE_FIXED|WRITEV)/) uwrite++
            if ($0 ~ /opcode FSYNC/) ufsync++
        }
        END {
            printf "  %-8s %-6s per request: io_uring writes %.2f, fsyncs %.2f | device writes %.2f (FUA %.2f, preflush %.2f, metadata %.2f), flushes %.2f\n",
                mode, method, uwrite / n, ufsync / n, write / n, fua / n, preflush / n, meta / n, flush / n
        }' "$work/trace"
}

# run TARGET: every mode against the raw loop device (TARGET=device) or a data directory on
# an ext4 filesystem made on it (TARGET=ext4), where the journal shows up too.
run() {
    local target=$1
    local store=(--device "$loop" --capacity 768MiB --reformat)
    if [ "$target" = ext4 ]; then
        mkfs.ext4 -q -F "$loop"
        mkdir -p "$work/mnt"
        mount "$loop" "$work/mnt"
        store=(--data-dir "$work/mnt/store" --capacity 512MiB)
    fi
    echo "$target:"
    for mode in ${BASELINE_BIN:+baseline} group dsync none; do
        rm -f "$work/addr"
        [ "$target" = ext4 ] && rm -rf "$work/mnt/store"
        node=$bin
        flags=(--durability "$mode")
        if [ "$mode" = baseline ]; then
            node=$BASELINE_BIN
            flags=()
        fi
        "$node" "${store[@]}" --threads 1 --memory 0 "${flags[@]}" \
            --listen 127.0.0.1:0 --addr-file "$work/addr" --log warn >"$work/node.log" 2>&1 &
        pid=$!
        for _ in $(seq 600); do [ -s "$work/addr" ] && break; sleep 0.05; done
        python3 "$work/client.py" "$(cat "$work/addr")" PUT 20 warm
        pass "$mode" PUT "$mode"
        pass "$mode" DELETE "$mode"
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        pid=
    done
    if [ "$target" = ext4 ]; then umount "$work/mnt"; fi
}
run device
run ext4
