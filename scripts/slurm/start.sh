#!/usr/bin/env bash
# Starts a one-node Slurm cluster for tests, every file of it under one directory.
#
# Usage: scripts/slurm/start.sh DIR        (as root; Debian's munge, slurmctld, slurmd
#                                           and slurm-client installed)
#
# DIR (created if missing; whatever a previous cluster left there is stopped and
# removed first) receives the munge key and socket, slurm.conf, the controller's state,
# slurmd's spool, the pid list and the logs (DIR/log). munged runs as the `munge` user,
# slurmctld and slurmd as root, in the background, on free TCP ports. The script waits
# until `sinfo` shows the node idle and prints, as its only line on stdout,
#     SLURM_CONF=DIR/slurm.conf
# to export for sbatch, squeue, scontrol... `scripts/slurm/stop.sh DIR` stops it.
#
# Tuned for fast tests: a requeued job may start again after 10 s (cred_expire, the
# least Slurm accepts), the scheduler runs every second, and up to 4 jobs share each
# core (OverSubscribe=FORCE:4), so that several test jobs run at once on a small VM. Slurm checks time limits and
# sends --signal warnings every 30 s (fixed in slurmctld): `--signal=B:USR1@N` comes
# up to 30 s before `end - N`.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
# shellcheck source=scripts/slurm/common.sh
. "$(dirname "$0")/common.sh" "$1"

# --- slurm.conf -------------------------------------------------------------------------
# Ports in use (TCP, any state) from /proc/net/tcp{,6}.
used_ports() {
    local _sl addr _rest
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | while read -r _sl addr _rest; do
        case "$addr" in *:*) echo $((16#${addr##*:})) ;; esac
    done
}
free_port() {
    local used p
    used="$(used_ports)"
    while :; do
        p=$((20000 + RANDOM % 40000))
        grep -qx "$p" <<<"$used" || { echo "$p"; return; }
    done
}

host="$(hostname -s)"

write_conf() {
    {
        cat <<CONF
# One-node test cluster written by scripts/slurm/start.sh; every path under $dir.
ClusterName=stasistest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$1
SlurmdPort=$2
SlurmdSpoolDir=$dir/spool
SlurmdPidFile=$dir/slurmd.pid
SlurmdLogFile=$dir/log/slurmd.log
CONF
        conf_settings
        echo "$node NodeAddr=127.0.0.1 State=UNKNOWN"
        echo "PartitionName=test Nodes=$nodename Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
    } >"$conf"
}

# slurmctld and slurmd on free ports; a port taken between the choice and the bind
# (by another program) makes a daemon exit: then both are tried again on others.
started=
for _attempt in 1 2 3; do
    ctld_port="$(free_port)"
    slurmd_port="$(free_port)"
    [ "$ctld_port" != "$slurmd_port" ] || continue
    write_conf "$ctld_port" "$slurmd_port"
    setsid slurmctld -D -i -f "$conf" </dev/null >>"$dir/log/slurmctld.out" 2>&1 &
    ctld=$!
    echo "slurmctld $ctld" >>"$pids"
    ctld_up() { alive "$ctld" || return 2; scontrol ping | grep -q UP; }
    if ! wait_for 20 ctld_up; then
        kill -KILL "$ctld" 2>/dev/null || true
        continue
    fi
    setsid slurmd -D -f "$conf" </dev/null >>"$dir/log/slurmd.out" 2>&1 &
    sd=$!
    echo "slurmd $sd" >>"$pids"
    node_idle() {
        alive "$sd" && alive "$ctld" || return 2
        [ "$(sinfo -h -N -n "$nodename" -o %t)" = idle ]
    }
    if wait_for 30 node_idle; then
        started=1
        break
    fi
    kill -KILL "$sd" "$ctld" 2>/dev/null || true
done
if [ -z "$started" ]; then
    echo "slurm/start.sh: the cluster did not start; logs in $dir/log:" >&2
    tail -n 15 "$dir"/log/* >&2 || true
    "$slurm_here/stop.sh" "$dir" >/dev/null || true
    exit 1
fi
echo "SLURM_CONF=$conf"
