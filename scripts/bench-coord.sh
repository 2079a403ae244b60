#!/usr/bin/env bash
# Measures the time the multi-node coordinator protocol adds per global checkpoint, with
# 1, 16, 64 and 256 agents (threads of one process, over loopback TCP), twice: with a
# part that does nothing (the protocol and the publication alone) and with the simulated
# part (every agent writes and syncs a 4 KiB file). Prints one table per case.
# Usage: ./scripts/bench-coord.sh [ROUNDS] [AGENTS]   (defaults 30, 1,16,64,256)
#        STASIS_BENCH_DIR=DIR puts the scratch checkpoints there (default $TMPDIR).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-30}
agents=${2:-1,16,64,256}
cargo build --release -p stasis >&2
bin=target/release/stasis
base=${STASIS_BENCH_DIR:-${TMPDIR:-/tmp}}/stasis-bench-coord-$$
ulimit -n 4096 2>/dev/null || true
echo "## $(nproc) cores, $(uname -r), checkpoints in $base"
"$bin" coord-bench --agents "$agents" --rounds "$rounds" --dir "$base/null"
echo
"$bin" coord-bench --agents "$agents" --rounds "$rounds" --write --dir "$base/write"
rm -rf "$base"
