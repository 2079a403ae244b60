#!/usr/bin/env bash
# Starts a Slurm cluster on the nodes of a test bed (scripts/nodes/up.sh BED N), every
# file of it under one directory: slurmctld on BED-1, one slurmd on each node (each in
# its node's namespaces, so it takes the node's hostname as its NodeName), munged in
# the host (its socket is a path, reachable from every node).
#
# Usage: scripts/slurm/start-bed.sh DIR BED   (as root; munge, slurmctld, slurmd and
#                                              slurm-client installed)
#
# Slurm's commands must run on a node (scripts/nodes/on.sh BED-K ...): the host has no
# address on the test bed. Otherwise as scripts/slurm/start.sh (its tuning, DIR's
# layout, `SLURM_CONF=DIR/slurm.conf` printed once every node is idle, stop.sh to stop).
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 DIR BED" >&2; exit 2; }
bed=$2
nodes_dir="$(cd "$(dirname "$0")/../nodes" && pwd)"
# shellcheck source=scripts/nodes/common.sh
. "$nodes_dir/common.sh"
list="$NODES_RUN/$bed/nodes"
[ -s "$list" ] || { echo "slurm/start-bed.sh: no test bed $bed (scripts/nodes/up.sh)" >&2; exit 1; }
# shellcheck source=scripts/slurm/common.sh
. "$(dirname "$0")/common.sh" "$1"

first="$(awk 'NR == 1 { print $1 " " $2 }' "$list")"
names="$(awk '{ print $1 }' "$list" | paste -sd, -)"
{
    cat <<CONF
# A test cluster on the nodes of test bed $bed, written by scripts/slurm/start-bed.sh.
ClusterName=stasisbed
SlurmctldHost=${first% *}(${first#* })
SlurmctldPort=6817
SlurmdPort=6818
SlurmdSpoolDir=$dir/spool/%n
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmdLogFile=$dir/log/slurmd-%n.log
CONF
    conf_settings
    while read -r n a; do
        echo "NodeName=$n NodeAddr=$a $hardware State=UNKNOWN"
    done <"$list"
    echo "PartitionName=test Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
} >"$conf"

setsid "$nodes_dir/on.sh" "${first% *}" slurmctld -D -i -f "$conf" </dev/null \
    >>"$dir/log/slurmctld.out" 2>&1 &
echo "slurmctld $!" >>"$pids"
ctld_up() { alive "$(pid_of slurmctld)" || return 2; "$nodes_dir/on.sh" "${first% *}" scontrol ping | grep -q UP; }
wait_for 20 ctld_up || die "slurmctld did not start: $(tail -n 15 "$dir"/log/slurmctld.* 2>&1)"
while read -r n _; do
    mkdir -p "$dir/spool/$n"
    setsid "$nodes_dir/on.sh" "$n" slurmd -D -f "$conf" </dev/null >>"$dir/log/slurmd-$n.out" 2>&1 &
    echo "slurmd $!" >>"$pids"
done <"$list"
all_idle() {
    local states
    states="$("$nodes_dir/on.sh" "${first% *}" sinfo -h -N -o %t | sort -u | paste -sd, -)"
    [ "$states" = idle ]
}
if ! wait_for 30 all_idle; then
    echo "slurm/start-bed.sh: the nodes did not all come up; logs in $dir/log:" >&2
    tail -n 15 "$dir"/log/* >&2 || true
    "$slurm_here/stop.sh" "$dir" >/dev/null || true
    exit 1
fi
echo "SLURM_CONF=$conf"
