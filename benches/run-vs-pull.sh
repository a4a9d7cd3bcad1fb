#!/usr/bin/env bash
# Lazy loading against a full pull, on the corpus, with a 5-node local fleet and a local
# origin (one run, everything on this machine):
#   1. `slapshot run python -- python3 -c "import json"`:
#      cold  = empty worker caches, warm fleet (the chunks were read once before, by
#              another worker, which filled the fleet);
#      warm  = the same worker again (its disk cache; a new agent has an empty memory);
#      pull  = copy every layer blob of the image out of the origin directory, umoci
#              unpack, chroot the same command;
#      with bytes fetched and the agent's peak RSS (GNU time's max RSS of `slapshot run`,
#      which does not include the python process: that is its child, counted apart).
#   2. Sequential read of the 129 MB java `lib/modules` through `slapshot mount` (dd, 1 MiB
#      blocks): cold (empty worker caches, warm fleet), warm from the agent (page cache
#      dropped, agent memory large enough), and the same file read from an unpacked rootfs
#      with the page cache dropped and warm; the mount agent's peak RSS (VmHWM). Once with
#      whole-file copies read by passthrough (the default) and once with --files 0.
#
# Needs root, /dev/fuse, umoci, GNU time, and the corpus (../shared/corpus/build-images.sh
# DIR, then pass DIR/oci). Usage: benches/run-vs-pull.sh OCI_LAYOUT [ROUNDS, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
layout=${1:?usage: run-vs-pull.sh OCI_LAYOUT [ROUNDS]}
rounds=${2:-3}
cargo build --release --locked >&2
bin=$PWD/target/release/slapshot
work=$(mktemp -d /tmp/run-vs-pull.XXXX)
fleet_pid=
mount_pid=
cleanup() {
    [ -n "$mount_pid" ] && kill "$mount_pid" 2>/dev/null && wait "$mount_pid" 2>/dev/null || true
    [ -n "$fleet_pid" ] && kill "$fleet_pid" 2>/dev/null && wait "$fleet_pid" 2>/dev/null || true
    umount -l "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

"$bin" fleet up --nodes 5 --dir "$work/fleet" --capacity 2GiB >/dev/null 2>"$work/fleet.log" &
fleet_pid=$!
while [ ! -f "$work/fleet/slapshot.toml" ]; do sleep 0.2; done
export SLAPSHOT_CONFIG=$work/fleet/slapshot.toml
for tag in python java; do
    "$bin" flatten "oci:$layout:$tag" --name "$tag" --json > "$work/flatten-$tag.json"
done
image_bytes=$(sed 's/.*"bytes":\([0-9]*\).*/\1/' "$work/flatten-python.json")

echo "== slapshot run python -- python3 -c 'import json' (image: $((image_bytes / 1000000)) MB)"
# Another worker reads first: it fills the fleet from the origin.
"$bin" run python --cache-dir "$work/cache-warmup" -q -- python3 -c "import json"
cold=(); warm=(); fetched=; rss_cold=; rss_warm=
for i in $(seq "$rounds"); do
    drop_caches
    t0=$(now)
    /usr/bin/time -f %M -o "$work/rss" "$bin" run python --cache-dir "$work/cache-$i" -- python3 -c "import json" 2>"$work/run-$i.log"
    t1=$(now); cold+=("$(echo "$t1 - $t0" | bc -l)"); rss_cold=$(cat "$work/rss")
    fetched=$(grep -o 'fetched [^(]*(' "$work/run-$i.log" | head -1)
    t0=$(now)
    /usr/bin/time -f %M -o "$work/rss" "$bin" run python --cache-dir "$work/cache-$i" -q -- python3 -c "import json"
    t1=$(now); warm+=("$(echo "$t1 - $t0" | bc -l)"); rss_warm=$(cat "$work/rss")
done
tail -1 "$work/run-1.log"
pull=()
for i in $(seq "$rounds"); do
    drop_caches
    rm -rf "$work/pull"
    t0=$(now)
    mkdir -p "$work/pull/oci"
    cp -r "$layout/oci-layout" "$layout/index.json" "$layout/blobs" "$work/pull/oci/"
    umoci unpack --image "$work/pull/oci:python" "$work/pull/bundle" >/dev/null
    chroot "$work/pull/bundle/rootfs" python3 -c "import json"
    t1=$(now); pull+=("$(echo "$t1 - $t0" | bc -l)")
done
c=$(printf '%s\n' "${cold[@]}" | median); w=$(printf '%s\n' "${warm[@]}" | median); p=$(printf '%s\n' "${pull[@]}" | median)
printf 'cold run   %7.3f s   (%s)  agent max RSS %d MB\n' "$c" "${fetched%(}" $((rss_cold / 1024))
printf 'warm run   %7.3f s   agent max RSS %d MB\n' "$w" $((rss_warm / 1024))
printf 'full pull  %7.3f s   (copy all blobs + umoci unpack + run)\n' "$p"
printf 'pull / cold = %.1fx\n' "$(echo "$p / $c" | bc -l)"

echo "== sequential read of java lib/modules (129 MB), dd bs=1M"
file=usr/lib/jvm/java-17-openjdk-amd64/lib/modules
mkdir -p "$work/mnt"
"$bin" mount java "$work/mnt" --cache-dir "$work/cache-java-warmup" 2>/dev/null &
mount_pid=$!
while ! mountpoint -q "$work/mnt"; do sleep 0.2; done
dd if="$work/mnt/$file" of=/dev/null bs=1M 2>/dev/null   # fills the fleet
kill "$mount_pid"; wait "$mount_pid" 2>/dev/null || true
mbps() { dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ {print $(NF-1), $NF}'; }
# Warm reads are short (tens of ms): ten in a row, three rounds alternating, medians.
warm_gbps() {
    local t0 t1; t0=$(now)
    for _ in 1 2 3 4 5 6 7 8 9 10; do dd if="$1" of=/dev/null bs=1M 2>/dev/null; done
    t1=$(now); echo "10 * 128.882471 / 1000 / ($t1 - $t0)" | bc -l
}
umoci unpack --image "$layout:java" "$work/java" >/dev/null
# Twice: with whole-file copies read by passthrough (the default), and without (--files 0:
# every read through the agent and the FUSE page cache).
for files in 1GiB 0; do
    echo "-- --files $files"
    rm -rf "$work/cache-java"
    "$bin" mount java "$work/mnt" --cache-dir "$work/cache-java" --memory 512MiB --files "$files" 2>/dev/null &
    mount_pid=$!
    while ! mountpoint -q "$work/mnt"; do sleep 0.2; done
    drop_caches
    echo "cold (warm fleet):            $(mbps "$work/mnt/$file")"
    sleep 2   # the whole-file copy, if any, is written after the read
    drop_caches
    echo "warm (agent), page cache dropped: $(mbps "$work/mnt/$file")"
    drop_caches
    echo "native, page cache dropped:   $(mbps "$work/java/rootfs/$file")"
    m=(); n=()
    for _ in 1 2 3; do
        m+=("$(warm_gbps "$work/mnt/$file")"); n+=("$(warm_gbps "$work/java/rootfs/$file")")
    done
    mm=$(printf '%s\n' "${m[@]}" | median); nm=$(printf '%s\n' "${n[@]}" | median)
    printf 'warm, page cache: mount %.2f GB/s, native %.2f GB/s (%.2fx)\n' "$mm" "$nm" "$(echo "$mm / $nm" | bc -l)"
    echo "agent VmHWM: $(awk '/VmHWM/ {print $2, $3}' /proc/$mount_pid/status) (memory tier 512 MiB)"
    "$bin" stats "$work/mnt" | tail -1
    kill "$mount_pid"; wait "$mount_pid" 2>/dev/null || true; mount_pid=
done
