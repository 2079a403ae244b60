#!/usr/bin/env bash
# How long a checkpoint pauses a process tree (issue #12: an MPI job is a tree, its
# ranks each with their memory): N processes of SIZE MiB each (bench/memload, random
# content) under one `sh`, checkpointed with copy-on-write snapshots of every
# process (`stasis checkpoint`, the tree runs on), against, in the same run, one
# process of SIZE MiB alone (its snapshot fork is the bound: the tree pays about N of
# them) and the tree copied while frozen (`checkpoint --kill`, no snapshots).
#
#   ./scripts/bench-tree.sh                 # 4 x 1024 MiB, 4 KiB and huge pages
#   N=2 SIZE=256 ROUNDS=2 ./scripts/bench-tree.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-4}
SIZE=${SIZE:-1024}
ROUNDS=${ROUNDS:-3}
B=$(mktemp -d /dev/shm/stasis-bench-tree.XXXXXX)
trap 'rm -rf "$B"; pkill -f "$B" 2>/dev/null || true' EXIT
cargo build --release -q -p stasis
S=$PWD/target/release/stasis
cc -O2 -o "$B/memload" bench/memload.c

wait_ready() { # file count
    local end=$(( $(date +%s) + 300 ))
    until [ "$(grep -c ready "$1" 2>/dev/null)" -ge "$2" ]; do
        [ "$(date +%s)" -lt "$end" ] || { echo "timeout: $1" >&2; exit 1; }
        sleep 0.1
    done
}
pause_of() { sed -n 's/.*paused \([0-9.]*\) ms.*/\1/p' "$1"; }

for pages in 4k huge; do
    huge=""; [ "$pages" = huge ] && huge="huge"
    # One process alone.
    W=$B/one-$pages; D=$B/ck-one-$pages; mkdir -p "$W"
    (cd "$W" && exec "$S" run --tmp host --dir "$D" -- "$B/memload" "$SIZE" random 0 $huge >"$W/out" 2>"$W/err") &
    wait_ready "$W/out" 1
    one=""
    for r in $(seq "$ROUNDS"); do
        "$S" checkpoint --keep 1 "$D" 2>"$W/ck"; one="$one $(pause_of "$W/ck")"
    done
    "$S" checkpoint --kill --keep 1 "$D" 2>/dev/null || true
    wait
    # The tree.
    W=$B/tree-$pages; D=$B/ck-tree-$pages; mkdir -p "$W"
    cmd=""
    for i in $(seq "$N"); do cmd="$cmd \"$B/memload\" $SIZE random 0 $huge &"; done
    (cd "$W" && exec "$S" run --tmp host --dir "$D" -- sh -c "$cmd wait" >"$W/out" 2>"$W/err") &
    wait_ready "$W/out" "$N"
    tree=""
    for r in $(seq "$ROUNDS"); do
        "$S" checkpoint --keep 1 "$D" 2>"$W/ck"; tree="$tree $(pause_of "$W/ck")"
    done
    "$S" checkpoint --kill --keep 1 "$D" 2>"$W/ckk"; frozen=$(pause_of "$W/ckk")
    wait
    echo "$pages pages: 1 x $SIZE MiB paused (ms):$one | $N x $SIZE MiB tree with snapshots:$tree | tree copied while frozen (--kill): $frozen"
done
