#!/usr/bin/env bash
# Stops the test cluster scripts/slurm/start.sh started in DIR: its daemons, the
# slurmstepd processes of its jobs and the jobs' processes, and nothing else.
#
# Usage: scripts/slurm/stop.sh DIR
#
# What belongs to the cluster is found by its environment: start.sh gives munged,
# slurmctld and slurmd STASIS_SLURM_CLUSTER=DIR (slurmstepd inherits it from slurmd),
# and every job submitted to it carries SLURM_CONF=DIR/slurm.conf (sbatch passes the
# submitter's environment on). The daemons get SIGTERM (their own helpers, such as
# slurmctld's slurmscriptd, are left to them), everything else SIGKILL; what is still
# there after 5 s gets SIGKILL too. Nothing there: nothing done. Exits 0 once nothing
# of the cluster runs (within 10 s), 1 if something survived.
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
[ -d "$1" ] || exit 0
dir="$(cd "$1" && pwd)"

# Our own processes never count, whatever their environment says.
unset STASIS_SLURM_CLUSTER SLURM_CONF
ours=" $$ "
p=$$
while [ "$p" -gt 1 ] 2>/dev/null; do
    p="$(awk '{ print $4 }' "/proc/$p/stat" 2>/dev/null)" || break
    ours+="$p "
done

# Pids whose environment names this cluster.
members() {
    local e p
    grep -lszxF -e "STASIS_SLURM_CLUSTER=$dir" -e "SLURM_CONF=$dir/slurm.conf" \
        /proc/[0-9]*/environ | while read -r e; do
        p="${e#/proc/}"
        p="${p%/environ}"
        [[ "$ours" == *" $p "* ]] || echo "$p"
    done
}

# Daemons first (orderly), by the pids start.sh recorded, if they are still those.
daemons=()
if [ -f "$dir/pids" ]; then
    while read -r _name pid; do
        [ -n "$pid" ] && grep -qszxF "STASIS_SLURM_CLUSTER=$dir" "/proc/$pid/environ" &&
            daemons+=("$pid")
    done <"$dir/pids"
fi
[ ${#daemons[@]} -gt 0 ] && kill -TERM "${daemons[@]}" 2>/dev/null

for ((i = 0; i < 100; i++)); do
    left=()
    for p in $(members); do
        parent="$(awk '{ print $4 }' "/proc/$p/stat" 2>/dev/null)"
        if [ "$i" -lt 50 ] && [[ " ${daemons[*]} " == *" $p "* || " ${daemons[*]} " == *" $parent "* ]]; then
            # a daemon shutting down, or a helper it stops itself (slurmctld's
            # slurmscriptd): 5 s before SIGKILL
            left+=("$p")
        else
            kill -KILL "$p" 2>/dev/null && left+=("$p")
        fi
    done
    [ ${#left[@]} -eq 0 ] && exit 0
    sleep 0.1
done
echo "slurm/stop.sh: still running after 10 s: ${left[*]}" >&2
exit 1
