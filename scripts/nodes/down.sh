#!/usr/bin/env bash
# Tears down test bed NAME (scripts/nodes/up.sh): kills every process still in one of its
# nodes, removes the nodes' namespaces, the bridge, the nodes' OpenMPI session
# directories (/tmp/ompi.NODE.*) and $STASIS_NODES_RUN/NAME. Safe to run twice.
# Usage: scripts/nodes/down.sh NAME
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
[ $# -eq 1 ] || die "usage: down.sh NAME"
name=$1
[[ $name =~ ^[a-z0-9]{1,8}$ ]] || die "bad NAME: $name"
bed=$NODES_RUN/$name
nodes() { ls /run/netns 2>/dev/null | grep -E "^$name-[0-9]+\$"; }
# Processes in a node's network namespace (detached ones too); again until none is left.
for try in $(seq 1 50); do
    left=0
    for node in $(nodes); do
        pids=$(ip netns pids "$node" 2>/dev/null)
        [ -n "$pids" ] || continue
        left=1
        kill -KILL $pids 2>/dev/null
    done
    [ $left -eq 0 ] && break
    sleep 0.1
done
for node in $(nodes); do ip netns del "$node" 2>/dev/null; rm -rf /tmp/ompi."$node".* ; done
ip link del "$name-br" 2>/dev/null
if [ -d "$bed" ]; then
    for f in "$bed"/*/uts "$bed"/*/ipc; do
        [ -e "$f" ] && { umount "$f" 2>/dev/null; rm -f "$f"; }
    done
    rm -rf "$bed"
fi
[ -z "$(nodes)" ] && ! ip link show "$name-br" >/dev/null 2>&1 && [ ! -e "$bed" ] || die "could not remove all of test bed $name"
