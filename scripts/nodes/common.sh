# Shared by up.sh, down.sh, on.sh and rsh (sourced, not run).
# A test bed NAME lives in $STASIS_NODES_RUN/NAME (default /run/stasis-nodes/NAME):
#   nodes        one line per node: "NAME-K ADDRESS"
#   hosts        the /etc/hosts every command on a node sees (all nodes named)
#   K/uts K/ipc  the node's UTS and IPC namespaces (nsfs bind mounts)
#   K/shm/       the node's /dev/shm
# and its network namespaces are /run/netns/NAME-K (ip netns), joined by bridge NAME-br.
NODES_RUN=${STASIS_NODES_RUN:-/run/stasis-nodes}

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# node_dir NODE -> prints "STATE_DIR K" for node NODE (a name or an address); an address
# is looked up in $STASIS_NODES (a test bed name) only when that is set, since every test
# bed uses the same addresses.
find_node() {
    local want=$1 beds bed name addr k
    if [ -n "${STASIS_NODES:-}" ]; then beds=("$NODES_RUN/$STASIS_NODES"); else beds=("$NODES_RUN"/*); fi
    for bed in "${beds[@]}"; do
        [ -f "$bed/nodes" ] || continue
        while read -r name addr; do
            if [ "$name" = "$want" ] || { [ -n "${STASIS_NODES:-}" ] && [ "$addr" = "$want" ]; }; then
                k=${name##*-}
                echo "$bed $k"
                return 0
            fi
        done <"$bed/nodes"
    done
    return 1
}

# enter_node STATE_DIR K CMD... : runs CMD (exec) inside node K: its network, UTS and IPC
# namespaces, and a mount namespace of its own where /etc/hosts names every node and
# /dev/shm is the node's.
enter_node() {
    local bed=$1 k=$2; shift 2
    local name; name=$(basename "$bed")-$k
    exec nsenter --net="/run/netns/$name" --uts="$bed/$k/uts" --ipc="$bed/$k/ipc" -- \
        unshare --mount --propagation private -- /bin/sh -c '
            mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/$2/shm" /dev/shm || exit 126
            shift 2; exec "$@"' enter-node "$bed" "$k" "$@"
}
