#!/usr/bin/env bash
# How long a checkpoint pauses a real MPI job (issue #12): OpenMPI's mpirun and N
# ranks of SIZE MiB each (bench/mpimem.c: random memory, an allreduce every 10 ms),
# under `stasis run` with its defaults (private /tmp and /dev/shm, where OpenMPI keeps
# its shared-memory segments), checkpointed ROUNDS times while it runs on. Against,
# in the same run, one process of SIZE MiB alone (bench/memload.c): its snapshot fork
# is the bound, and a tree of N ranks pays about N / cores of them.
#
#   ./scripts/bench-mpi.sh                  # 4 x 1024 MiB and 4 x 16 MiB, 8 rounds
#   N=2 SIZES="256" ROUNDS=4 ./scripts/bench-mpi.sh
#   STASIS_BIN=/path/to/stasis ./scripts/bench-mpi.sh    # another build
#   CKFLAGS=--incremental ./scripts/bench-mpi.sh         # flags of every checkpoint
#   BINS=DIR ./scripts/bench-mpi.sh     # memload and mpimem built already (no compilers)
#   LOGS=DIR STASIS_LOG=debug ./scripts/bench-mpi.sh     # keep each run's log there
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-4}
SIZES=${SIZES:-"1024 16"}
ROUNDS=${ROUNDS:-8}
CKFLAGS=${CKFLAGS:-}
command -v mpirun.openmpi >/dev/null || { echo "needs OpenMPI (openmpi-bin, libopenmpi-dev)" >&2; exit 1; }
B=$(mktemp -d /var/tmp/stasis-bench-mpi.XXXXXX)
trap 'pkill -KILL -f "$B" 2>/dev/null || true; rm -rf "$B" /dev/shm/stasis-bench-mpi-ck.*; true' EXIT
if [ -n "${STASIS_BIN:-}" ]; then
    S=$STASIS_BIN
else
    cargo build --release -q -p stasis
    S=$PWD/target/release/stasis
fi
if [ -n "${BINS:-}" ]; then
    cp "$BINS/memload" "$BINS/mpimem" "$B/"
else
    cc -O2 -o "$B/memload" bench/memload.c
    mpicc.openmpi -O2 -o "$B/mpimem" bench/mpimem.c
fi

wait_ready() { # file
    local end=$(( $(date +%s) + 300 ))
    until grep -q ready "$1" 2>/dev/null; do
        [ "$(date +%s)" -lt "$end" ] || { echo "timeout: $1" >&2; exit 1; }
        sleep 0.2
    done
}
pause_of() { sed -n 's/.*paused \([0-9.]*\) ms.*/\1/p' "$1"; }
stats() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {printf "median %s (%s-%s)", a[int((NR+1)/2)], a[1], a[NR]}'; }
# checkpoints DIR LABEL: ROUNDS checkpoints 1.5 s apart, then --kill; prints the pauses.
checkpoints() {
    local p="" r
    for r in $(seq "$ROUNDS"); do
        sleep 1.5
        # shellcheck disable=SC2086 # CKFLAGS: words
        "$S" checkpoint $CKFLAGS --keep 1 "$1" 2>"$B/ck.err" || { cat "$B/ck.err" >&2; exit 1; }
        p="$p $(pause_of "$B/ck.err")"
    done
    "$S" checkpoint --kill --keep 1 "$1" >/dev/null 2>&1 || true
    echo "$p"
}

echo "$(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg), checkpoint flags: ${CKFLAGS:-none}"
for size in $SIZES; do
    D=$(mktemp -d /dev/shm/stasis-bench-mpi-ck.XXXXXX)
    (cd "$B" && exec "$S" run --dir "$D/one" -- "$B/memload" "$size" random >"$B/one.out" 2>/dev/null) &
    wait_ready "$B/one.out"
    one=$(checkpoints "$D/one"); wait || true
    (cd "$B" && exec "$S" run --dir "$D/mpi" -- mpirun.openmpi --allow-run-as-root --oversubscribe \
        -np "$N" "$B/mpimem" "$size" >"$B/mpi.out" 2>"$B/mpi.err") &
    wait_ready "$B/mpi.out"
    mpi=$(checkpoints "$D/mpi"); wait || true
    [ -z "${LOGS:-}" ] || { mkdir -p "$LOGS"; cp "$B/mpi.err" "$LOGS/mpi-$size${CKFLAGS// /}.log"; }
    rm -rf "$D"
    echo "$size MiB per process, paused (ms): 1 process $(echo "$one" | stats) | mpirun + $N ranks $(echo "$mpi" | stats)"
    echo "  samples: 1 process:$one | MPI:$mpi"
done
