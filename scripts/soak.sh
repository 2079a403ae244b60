#!/usr/bin/env bash
# The long load test of issue #14: a busy 8-process job (tests/progs/ring.c)
# checkpointed every second for STASIS_SOAK_SECS seconds (default 600), checking
# that nothing is lost and that the supervising init leaks neither descriptors
# nor memory; then 100 kill/restart cycles in a row. CI runs the same test for 15 s.
set -euo pipefail
cd "$(dirname "$0")/.."
export STASIS_SOAK_SECS="${STASIS_SOAK_SECS:-600}"
exec cargo test -p stasis --test load -- --test-threads=1 --nocapture
