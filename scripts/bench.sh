#!/usr/bin/env bash
# stasis benchmark. Prints every speed as a ratio to this machine's memory-copy
# bandwidth measured in the same run (machines are shared and noisy).
#
#   ./scripts/bench.sh                 # 1 GiB and 4 GiB processes, 512 threads
#   SIZES="256" THREADS="64" ./scripts/bench.sh   # quicker (THREADS="" skips it)
#   COMPRESS="" ...                    # skip the compressed checkpoints (zstd, lz4)
#
# Images go to tmpfs (/dev/shm) so that the disk is not what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"1024 4096"}
KINDS=${KINDS:-"random text zero"}
THREADS=${THREADS-"512"}
COMPRESS=${COMPRESS-"zstd lz4"}

B=$(mktemp -d /dev/shm/stasis-bench.XXXXXX)
trap 'rm -rf "$B"; pkill -f "$B" 2>/dev/null || true' EXIT
if [ -n "${STASIS_BIN:-}" ]; then
    # Prebuilt binaries (e.g. carried to another machine): STASIS_BIN and
    # BENCH_BIN_DIR holding membw, memload and threads.
    S=$(realpath "$STASIS_BIN")
    for p in membw memload threads; do cp "$BENCH_BIN_DIR/$p" "$B/$p"; done
else
    cargo build --release -q -p stasis
    S=$PWD/target/release/stasis
    for p in membw memload threads; do cc -O2 -pthread -o "$B/$p" "bench/$p.c"; done
fi

now() { date +%s.%N; }
wait_for() { # file pattern timeout_s
    local end=$(( $(date +%s) + $3 ))
    until grep -q "$2" "$1" 2>/dev/null; do
        [ "$(date +%s)" -lt "$end" ] || { echo "timeout waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1; }
        sleep 0.05
    done
}
ratio() { awk -v b="$1" -v t="$2" -v bw="$BW" 'BEGIN { printf "%.3f", (b / t) / bw }'; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) * 1000 }'; }

BW=$("$B/membw" 1024)
echo "memcpy bandwidth: $(awk -v b="$BW" 'BEGIN { printf "%.2f GB/s", b / 1e9 }') (the 1.0 of every ratio below)"
echo "images on $(df -h /dev/shm | awk 'NR==2 {print $1}') (tmpfs); $(nproc) cores; stasis $($S --version)"
echo

for size in $SIZES; do
    for kind in $KINDS; do
        W=$B/w-$kind-$size; D=$B/ck-$kind-$size; mkdir -p "$W"
        bytes=$(( size << 20 ))
        (cd "$W" && exec "$S" run --tmp host --dir "$D" -- "$B/memload" "$size" "$kind" 5 >"$W/out" 2>"$W/err") &
        run=$!
        wait_for "$W/out" ready 300
        # A plain full checkpoint.
        t0=$(now); "$S" checkpoint --keep 1 "$D" 2>"$W/ck1"; t1=$(now)
        pause=$(sed -n 's/.*paused \([0-9.]*\) ms.*/\1/p' "$W/ck1")
        img=$(du -s --block-size=1 "$D"/checkpoint-* | awk '{s+=$1} END {print s}')
        rm -rf "$D"/checkpoint-*
        # --incremental on a first (full) checkpoint arms dirty-page tracking: the
        # address space is write-protected (while the process runs) before it.
        ta=$(now); "$S" checkpoint --incremental --keep 1 "$D" 2>"$W/ck0"; tb=$(now)
        # Incremental after 5% of the pages changed.
        touch "$W/change"; wait_for "$W/out" changed 60
        t2=$(now); "$S" checkpoint --incremental --keep 2 "$D" 2>"$W/ck3"; t3=$(now)
        inc=$(du -s --block-size=1 "$(ls -d "$D"/checkpoint-* | tail -n 1)" | awk '{print $1}')
        rm -rf "$D"/checkpoint-*
        # Compressed full checkpoints of the same process.
        comp=""
        for c in $COMPRESS; do
            t4=$(now); "$S" checkpoint --compress "$c" --keep 1 "$D" 2>"$W/ck-$c"; t5=$(now)
            csz=$(du -s --block-size=1 "$D"/checkpoint-* | awk '{s+=$1} END {print s}')
            comp="$comp | $c $(ms "$t4" "$t5") ms = $(ratio "$bytes" "$(awk -v a="$t4" -v b="$t5" 'BEGIN{print b-a}')") x memcpy, $(awk -v b="$csz" 'BEGIN { printf "%.1f", b / 1048576 }') MiB"
            rm -rf "$D"/checkpoint-*
        done
        t6=$(now); "$S" checkpoint --kill --keep 1 "$D" 2>"$W/ck2"; t7=$(now); wait "$run" || true
        "$S" -v restart "$D" >"$W/out2" 2>"$W/rs" &
        rs=$!
        wait_for "$W/rs" "restored process" 300
        rms=$(sed -n 's/.* in \([0-9.]*\) ms (verify.*/\1/p' "$W/rs")
        touch "$W/go"; wait "$rs" || true
        printf "%-6s MiB %-6s checkpoint %7.1f ms = %s x memcpy | pause %7.1f ms | image %6.1f MiB | restart %7.1f ms = %s x memcpy\n" \
            "$size" "$kind" "$(ms "$t0" "$t1")" "$(ratio "$bytes" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')")" \
            "$pause" "$(awk -v b="$img" 'BEGIN { printf "%.1f", b / 1048576 }')" \
            "$rms" "$(ratio "$bytes" "$(awk -v m="$rms" 'BEGIN{print m/1000}')")"
        printf "%-6s MiB %-6s incremental after 5%% changed: %7.1f ms (%.0f%% of full) | image %6.1f MiB (%.1f%% of full) | paused %s ms, %s | first --incremental (full, arms tracking) %7.1f ms\n" \
            "$size" "$kind" "$(ms "$t2" "$t3")" "$(awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" 'BEGIN { printf "%.0f", 100 * (d - c) / (b - a) }')" \
            "$(awk -v b="$inc" 'BEGIN { printf "%.1f", b / 1048576 }')" "$(awk -v a="$inc" -v b="$img" 'BEGIN { printf "%.1f", 100 * a / b }')" \
            "$(sed -n 's/.*paused \([0-9.]*\) ms.*/\1/p' "$W/ck3")" "$(grep -q 'copied while frozen' "$W/ck3" && echo 'copied while frozen' || echo 'from a snapshot')" \
            "$(ms "$ta" "$tb")"
        printf "%-6s MiB %-6s checkpoint --kill (full, frozen until killed): %7.1f ms = %s x memcpy\n" \
            "$size" "$kind" "$(ms "$t6" "$t7")" "$(ratio "$bytes" "$(awk -v a="$t6" -v b="$t7" 'BEGIN{print b-a}')")"
        [ -z "$comp" ] || printf "%-6s MiB %-6s compressed%s\n" "$size" "$kind" "$comp"
        rm -rf "$D" "$W"
    done
done

for n in $THREADS; do
    W=$B/t-$n; D=$B/ck-t-$n; mkdir -p "$W"
    (cd "$W" && exec "$S" run --tmp host --dir "$D" -- "$B/threads" "$n" >"$W/out" 2>"$W/err") &
    run=$!
    wait_for "$W/out" ready 120
    "$S" checkpoint --kill "$D" 2>"$W/ck"; wait "$run" || true
    freeze=$(sed -n 's/.*freeze \([0-9.]*\) ms.*/\1/p' "$W/ck")
    pause=$(sed -n 's/.*paused \([0-9.]*\) ms.*/\1/p' "$W/ck")
    "$S" -v restart "$D" >"$W/out2" 2>"$W/rs" &
    rs=$!
    wait_for "$W/rs" "restored process" 120
    rms=$(sed -n 's/.* in \([0-9.]*\) ms (verify.*/\1/p' "$W/rs")
    touch "$W/go"; wait "$rs" || true
    printf "%4d threads: freeze %7.1f ms | pause (freeze + dump) %7.1f ms | restore %7.1f ms\n" "$n" "$freeze" "$pause" "$rms"
    rm -rf "$D" "$W"
done
