#!/usr/bin/env bash
# Where the time of checkpoints goes: runs a memload process under `stasis run` with
# the debug log, takes checkpoints back to back and prints each one's wall time and
# the log's step timings.
#
#   ./scripts/phases.sh                      # 1 GiB and 4 GiB, 5% changed
#   SIZES=1024 PCT=2 ./scripts/phases.sh     # one size, 2% of the pages changed
#   ARGS='"" CHANGE --incremental' ...       # the checkpoints (CHANGE: make memload
#                                            # rewrite PCT% of its pages)
#   STASIS_BIN=... BENCH_BIN_DIR=...         # prebuilt binaries, as for bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${STASIS_BIN:-}" ]; then
    S=$(realpath "$STASIS_BIN"); M=$(realpath "$BENCH_BIN_DIR/memload")
else
    cargo build --release -q -p stasis
    S=$PWD/target/release/stasis
fi
B=$(mktemp -d /dev/shm/stasis-phases.XXXXXX)
trap 'rm -rf "$B"' EXIT
if [ -z "${STASIS_BIN:-}" ]; then M=$B/memload; cc -O2 -o "$M" bench/memload.c; fi
W=$B/w; D=$B/ck
eval "set -- ${ARGS:-'--incremental' CHANGE '--incremental'}"
for size in ${SIZES:-1024 4096}; do
    mkdir -p "$W"
    (cd "$W" && STASIS_LOG=stasis_core=debug exec "$S" run --tmp host --dir "$D" -- "$M" "$size" random "${PCT:-5}" >"$W/out" 2>"$W/err") &
    until grep -q ready "$W/out" 2>/dev/null; do sleep 0.05; done
    for a in "$@"; do
        if [ "$a" = CHANGE ]; then
            touch "$W/change"; until grep -q changed "$W/out"; do sleep 0.05; done; rm -f "$W/change"
            continue
        fi
        t0=$(date +%s.%N); "$S" checkpoint $a --keep 2 "$D" 2>&1 | sed 's/^/  /'; t1=$(date +%s.%N)
        echo "$size MiB checkpoint $a: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f ms", (b - a) * 1000 }')"
    done
    "$S" checkpoint --kill "$D" >/dev/null 2>&1 || true
    sleep 0.5
    sed 's/\x1b\[[0-9;]*m//g' "$W/err" | grep -E "DEBUG|WARN" | grep -vE "injected|snapshot [0-9]+ (ready|thread)" || true
    rm -rf "$D" "$W"
done
