#!/usr/bin/env bash
# What TCP connections cost a checkpoint and a restart (issue #10: with 1000
# established loopback connections, each holding queued bytes, a checkpoint pauses
# the job at most 100 ms longer than without them, and a restart takes at most 1 s
# longer).
#
#   ./scripts/bench-sockets.sh              # N=0 and N=1000 connections, 4 KiB queued each way
#   N=2000 ROUNDS=3 K=5 R=3 ./scripts/bench-sockets.sh
#   RUN_ARGS="--network private" ...        # options for `stasis run` (TCP_REPAIR path)
#   STASIS_BIN=... BENCH_BIN_DIR=... ...    # prebuilt stasis and tcpconns (as for bench.sh)
#
# bench/tcpconns runs under `stasis run --dir` on tmpfs (/dev/shm), once with 0
# connections (the baseline) and once with N, the same memory (MIB) in both. Per run:
# K checkpoints that leave it running (the pause is stasis's own "paused X ms"), then R
# times `checkpoint --kill` and `stasis restart`; the restart time is from launching
# `stasis restart` to the first tick line the program prints after it (ticks carry
# their wall-clock time, so polling does not add to it; the program ticks every 10 ms,
# so a restart can read up to 10 ms long). At the end the program reads back every
# connection's bytes and prints OK (or FAIL). ROUNDS alternates the two variants
# that many times (the machine is shared: compare medians from the same run).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}
K=${K:-5}
R=${R:-3}
ROUNDS=${ROUNDS:-2}
MIB=${MIB:-64}
BYTES=${BYTES:-4096}
RUN_ARGS=${RUN_ARGS:-}
PAUSE_BOUND=${PAUSE_BOUND:-100}
RESTART_BOUND=${RESTART_BOUND:-1000}


B=$(mktemp -d /dev/shm/stasis-bench-sockets.XXXXXX)
cleanup() { # our supervisors still running (they pass SIGTERM on to the job)
    for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$B"
}
trap cleanup EXIT
if [ -n "${STASIS_BIN:-}" ]; then
    S=$(realpath "$STASIS_BIN"); cp "$BENCH_BIN_DIR/tcpconns" "$B/tcpconns"
else
    cargo build --release -q -p stasis
    S=$PWD/target/release/stasis
    cc -O2 -o "$B/tcpconns" bench/tcpconns.c
fi

nowns() { date +%s%N; }
wait_for() { # file pattern timeout_s [pid whose end is a failure, stderr file]
    local end=$(( $(date +%s) + $3 ))
    until grep -q "$2" "$1" 2>/dev/null; do
        [ "$(date +%s)" -lt "$end" ] || { echo "timeout waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1; }
        ! grep -q '^FAIL' "$1" 2>/dev/null || { grep '^FAIL' "$1" >&2; exit 1; }
        [ -z "${4:-}" ] || kill -0 "$4" 2>/dev/null || grep -q "$2" "$1" ||
            { echo "stasis exited before '$2' appeared in $1:" >&2; cat "$5" >&2; exit 1; }
        sleep 0.02
    done
}
paused() { sed -n 's/.*paused \([0-9.]*\) ms.*/\1/p' "$1"; }
# median min max of the numbers in a file
stats() { sort -g "$1" | awk '{ v[NR] = $1 } END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.1f %.1f %.1f", m, v[1], v[NR] }'; }

echo "$($S --version); $(nproc) cores; $(uname -r); images on tmpfs ($B)"
echo "tcpconns: N=$N connections (and 0), $BYTES bytes queued each way, $MIB MiB; K=$K checkpoints, R=$R kill/restarts per run, $ROUNDS rounds${RUN_ARGS:+; stasis run $RUN_ARGS}"
echo

ok=1
for round in $(seq "$ROUNDS"); do
    for n in 0 "$N"; do
        W=$B/w-$n-$round; D=$B/ck-$n-$round; mkdir -p "$W"
        (cd "$W" && exec "$S" run --tmp host $RUN_ARGS --dir "$D" -- "$B/tcpconns" "$n" "$MIB" "$BYTES" >"$W/out" 2>"$W/err") &
        sup=$!
        wait_for "$W/out" ready 120 "$sup" "$W/err"
        sleep 0.2
        for k in $(seq "$K"); do
            t0=$(nowns); "$S" checkpoint --keep 1 "$D" 2>"$W/ck$k"; t1=$(nowns)
            p=$(paused "$W/ck$k")
            [ -n "$p" ] || { echo "checkpoint $k of N=$n failed:" >&2; cat "$W/ck$k" >&2; exit 1; }
            echo "$p" >>"$B/pause-$n"
            echo $(( (t1 - t0) / 1000000 )) >>"$B/ckwall-$n"
        done
        for r in $(seq "$R"); do
            t0=$(nowns); "$S" checkpoint --kill --keep 1 "$D" 2>"$W/kill$r"; t1=$(nowns)
            [ -n "$(paused "$W/kill$r")" ] || { echo "checkpoint --kill of N=$n failed:" >&2; cat "$W/kill$r" >&2; exit 1; }
            echo $(( (t1 - t0) / 1000000 )) >>"$B/killwall-$n"
            rc=0; wait "$sup" || rc=$?
            [ "$rc" = 75 ] || { echo "N=$n: supervisor exited $rc after checkpoint --kill, not 75" >&2; cat "$W/err" >&2; exit 1; }
            out=$W/out-r$r
            t0=$(nowns)
            (cd "$W" && exec "$S" -v restart "$D" >"$out" 2>"$W/rs$r") &
            sup=$!
            wait_for "$out" '^tick' 60 "$sup" "$W/rs$r"
            tick=$(awk '/^tick/ { print $3; exit }' "$out")
            echo $(( (tick - t0) / 1000000 )) >>"$B/restart-$n"
            # stasis's own account: restored ... in X ms (verify A ms, rebuild B ms)
            sed -n 's/.* in \([0-9.]*\) ms (verify \([0-9.]*\) ms, rebuild \([0-9.]*\) ms.*/\1 \2 \3/p' "$W/rs$r" >>"$B/restore-$n"
            sleep 0.2
        done
        touch "$W/go"
        rc=0; wait "$sup" || rc=$?
        if grep -q '^OK' "$out" && [ "$rc" = 0 ]; then
            echo "round $round, N=$n: $(grep '^OK' "$out")"
        else
            echo "round $round, N=$n: FAIL (exit $rc)"; grep -E '^FAIL' "$out" | head -5; ok=0
        fi
        rm -rf "$D"
    done
done

echo
awk '{ print $2 }' "$B/restore-0" >"$B/verify-0"; awk '{ print $3 }' "$B/restore-0" >"$B/rebuild-0"
awk '{ print $2 }' "$B/restore-$N" >"$B/verify-$N"; awk '{ print $3 }' "$B/restore-$N" >"$B/rebuild-$N"
row() { # label file-stem bound
    read -r m0 lo0 hi0 <<<"$(stats "$B/$2-0")"
    read -r m1 lo1 hi1 <<<"$(stats "$B/$2-$N")"
    local d verdict=""
    d=$(awk -v a="$m0" -v b="$m1" 'BEGIN { printf "%.1f", b - a }')
    if [ -n "$3" ]; then
        if awk -v d="$d" -v b="$3" 'BEGIN { exit !(d <= b) }'; then verdict="PASS (<= $3 ms)"; else verdict="FAIL (> $3 ms)"; ok=0; fi
    fi
    printf "| %-32s | %7.1f (%s-%s) | %7.1f (%s-%s) | %+7.1f | %s |\n" "$1" "$m0" "$lo0" "$hi0" "$m1" "$lo1" "$hi1" "$d" "$verdict"
}
printf "| %-32s | %s | %s | %s | %s |\n" "ms: median (min-max)" "N=0" "N=$N" "diff" "bound"
echo "|---|---|---|---|---|"
row "pause (checkpoint, job runs on)" pause "$PAUSE_BOUND"
row "checkpoint wall time" ckwall ""
row "checkpoint --kill wall time" killwall ""
row "restart (launch to first tick)" restart "$RESTART_BOUND"
row "  of which stasis verify" verify ""
row "  of which stasis rebuild" rebuild ""
echo
samples() { printf "%s: %s\n" "$1" "$(tr '\n' ' ' <"$B/$2")"; }
samples "pauses N=0" pause-0; samples "pauses N=$N" "pause-$N"
samples "restarts N=0" restart-0; samples "restarts N=$N" "restart-$N"
[ "$ok" = 1 ] && echo "PASS" || { echo "FAIL"; exit 1; }
