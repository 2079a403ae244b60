#!/usr/bin/env bash
# Runs a command on a node of a test bed (scripts/nodes/up.sh), in the foreground, with
# this shell's stdio: scripts/nodes/on.sh NODE CMD [ARGS...]
# NODE is a node name (NAME-K), or with STASIS_NODES=NAME also its address.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
[ $# -ge 2 ] || die "usage: on.sh NODE CMD [ARGS...]"
found=$(find_node "$1") || die "no node $1 in any test bed under $NODES_RUN"
shift
enter_node $found "$@"
