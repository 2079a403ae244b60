#!/usr/bin/env bash
# Brings up a test bed of N "nodes" on this machine (as root; needs iproute2, util-linux).
# Usage: scripts/nodes/up.sh NAME N [NET]
#   NAME  test bed name: 1-8 lower-case letters/digits (names the bridge NAME-br, the
#         nodes NAME-1 .. NAME-N, and $STASIS_NODES_RUN/NAME, default /run/stasis-nodes)
#   N     number of nodes (1-200)
#   NET   the first three octets of the nodes' /24 (default 198.18.0): node K is NET.K
# Each node is a network namespace with eth0 at NET.K/24 on a veth into bridge NAME-br
# (no address in the host, no route out), a UTS namespace (hostname NAME-K) and an IPC
# namespace of its own. Commands run on a node with scripts/nodes/on.sh (foreground) or
# scripts/nodes/rsh (a remote-shell stand-in for MPI launchers); each gets a mount
# namespace with an /etc/hosts naming every node and the node's own /dev/shm.
# Tear down with scripts/nodes/down.sh NAME (up.sh first tears down a previous NAME).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
[ $# -ge 2 ] || die "usage: up.sh NAME N [NET]"
name=$1 n=$2 net=${3:-198.18.0}
[[ $name =~ ^[a-z0-9]{1,8}$ ]] || die "NAME must be 1-8 lower-case letters or digits: $name"
[[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "N must be 1-200: $n"
[[ $net =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "NET must look like 198.18.0: $net"
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces)"
for t in ip nsenter unshare setsid; do command -v $t >/dev/null || die "$t is missing (apt-get install iproute2 util-linux)"; done

"$here/down.sh" "$name" >/dev/null 2>&1 || true
bed=$NODES_RUN/$name
mkdir -p "$bed"
trap '"$here/down.sh" "$name" >/dev/null 2>&1 || true' ERR
br=$name-br
ip link add "$br" type bridge
ip link set "$br" up
: >"$bed/nodes"
{ echo "127.0.0.1 localhost"; echo "::1 localhost ip6-localhost ip6-loopback"; } >"$bed/hosts.tmp"
for k in $(seq 1 "$n"); do
    node=$name-$k
    ip netns add "$node"
    ip link add "$name-v$k" type veth peer name eth0 netns "$node"
    ip link set "$name-v$k" master "$br" up
    ip -n "$node" addr add "$net.$k/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" link set lo up
    mkdir -p "$bed/$k/shm"
    chmod 1777 "$bed/$k/shm"
    touch "$bed/$k/uts" "$bed/$k/ipc"
    unshare --uts="$bed/$k/uts" --ipc="$bed/$k/ipc" hostname "$node"
    echo "$node $net.$k" >>"$bed/nodes"
    echo "$net.$k $node" >>"$bed/hosts.tmp"
done
mv "$bed/hosts.tmp" "$bed/hosts"
echo "$bed"
