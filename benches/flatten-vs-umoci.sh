#!/usr/bin/env bash
# Flatten throughput against `umoci unpack` of the same images, in one run, alternating:
# for each image of the corpus, umoci unpack into a fresh directory, then slapshot flatten
# into a fresh local origin (sealing and storing every chunk), ROUNDS times each. Prints
# MB/s of unpacked file bytes (what `slapshot flatten --json` reports as bytes) and the
# medians. The page cache holds the corpus for both (one warm-up pass first).
#
# Needs umoci, and the corpus: ../shared/corpus/build-images.sh DIR (then pass DIR/oci).
# Usage: benches/flatten-vs-umoci.sh OCI_LAYOUT [ROUNDS, default 3] [TAG ...]
set -euo pipefail
cd "$(dirname "$0")/.."
layout=${1:?usage: flatten-vs-umoci.sh OCI_LAYOUT [ROUNDS] [TAG ...]}
rounds=${2:-3}
shift 2 || shift $#
tags=("$@")
[ ${#tags[@]} -gt 0 ] || mapfile -t tags < <(umoci ls --layout "$layout")
cargo build --release --locked -p slapshot-client >&2
bin=$PWD/target/release/slapshot
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-14s %10s %12s %12s %7s\n' image MB "umoci MB/s" "slapshot MB/s" ratio
for tag in "${tags[@]}"; do
    # Warm the page cache with the image's blobs.
    cat "$layout"/blobs/sha256/* >/dev/null
    u=(); s=()
    bytes=0
    for _ in $(seq "$rounds"); do
        rm -rf "$work/bundle"
        t0=$(now); umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null; t1=$(now)
        u+=("$(echo "$t1 - $t0" | bc -l)")
        rm -rf "$work/bundle" "$work/origin"
        t0=$(now)
        json=$("$bin" flatten "oci:$layout:$tag" --origin "$work/origin" --key-file "$work/key" --json)
        t1=$(now)
        s+=("$(echo "$t1 - $t0" | bc -l)")
        bytes=$(echo "$json" | sed 's/.*"bytes":\([0-9]*\).*/\1/')
    done
    um=$(printf '%s\n' "${u[@]}" | median); sm=$(printf '%s\n' "${s[@]}" | median)
    printf '%-14s %10.1f %12.1f %12.1f %6.2fx\n' "$tag" "$(echo "$bytes/1000000" | bc -l)" \
        "$(echo "$bytes/1000000/$um" | bc -l)" "$(echo "$bytes/1000000/$sm" | bc -l)" \
        "$(echo "$um/$sm" | bc -l)"
done
