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

die() { echo "slurm/start.sh: $*" >&2; exit 1; }
# The daemons and mungekey are in sbin, which a plain user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

[ $# -eq 1 ] || die "usage: $0 DIR"
[ "$(id -u)" -eq 0 ] || die "must run as root (munged runs as the munge user, slurmd as root)"
for c in munged mungekey slurmctld slurmd sinfo scontrol setpriv; do
    command -v "$c" >/dev/null ||
        die "$c not found: install munge slurmctld slurmd slurm-client (scripts/test.sh does)"
done
id munge >/dev/null 2>&1 || die "no user munge (the munge package creates it)"

here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$1"
dir="$(cd "$1" && pwd)"
case "$dir" in *[[:space:]=,]*) die "DIR must not contain spaces, '=' or ',': $dir" ;; esac

# Leftovers of a previous cluster in DIR: stopped (only what it started), then removed.
"$here/stop.sh" "$dir" >/dev/null
rm -rf "${dir:?}"/*
mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
chmod 755 "$dir"
# munged wants its key, socket and log in a directory it owns that others cannot write.
chown munge:munge "$dir/munge"
chmod 755 "$dir/munge"

# Every process started here (and every process they start: slurmstepd inherits
# slurmd's environment) carries this variable; stop.sh finds them by it.
export STASIS_SLURM_CLUSTER="$dir"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"
# The daemons' working directory (never the caller's: a test that kills the processes in
# its directories must not kill them).
cd "$dir"
pids="$dir/pids"
: >"$pids"

# --- munge ----------------------------------------------------------------------------
as_munge=(setpriv --reuid munge --regid munge --clear-groups --)
"${as_munge[@]}" mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null 2>&1 ||
    die "mungekey --create failed"
sock="$dir/munge/munge.socket"
setsid "${as_munge[@]}" munged --foreground --socket="$sock" \
    --key-file="$dir/munge/munge.key" --log-file="$dir/munge/munged.log" \
    --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" \
    </dev/null >>"$dir/log/munged.out" 2>&1 &
echo "munged $!" >>"$pids"

# wait_for SECONDS COMMAND...: polls COMMAND every 0.1 s until it succeeds (0), for at
# most SECONDS; status 2 from COMMAND gives up at once.
wait_for() {
    local secs=$1 i r
    shift
    for ((i = 0; i < secs * 10; i++)); do
        r=0
        "$@" >/dev/null 2>&1 || r=$?
        [ "$r" -eq 0 ] && return 0
        [ "$r" -eq 2 ] && return 1
        sleep 0.1
    done
    return 1
}
alive() { kill -0 "$1" 2>/dev/null; }
pid_of() { awk -v n="$1" '$1 == n { print $2 }' "$pids" | tail -n 1; }

munged_up() { alive "$(pid_of munged)" || return 2; test -S "$sock"; }
wait_for 10 munged_up ||
    die "munged did not start: $(tail -n 5 "$dir/munge/munged.log" "$dir/log/munged.out" 2>&1)"

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
# The node line as slurmd sees this machine (CPUs, sockets, cores, memory).
node="$(slurmd -C 2>/dev/null | head -n 1)"
case "$node" in NodeName=*) ;; *) die "slurmd -C printed no node line: $node" ;; esac
node="${node%% UpTime=*}"
nodename="${node#NodeName=}"
nodename="${nodename%% *}"

write_conf() {
    cat >"$conf" <<CONF
# One-node test cluster written by scripts/slurm/start.sh; every path under $dir.
ClusterName=stasistest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$1
SlurmdPort=$2
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=300
InactiveLimit=0
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes=$nodename Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
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
    "$here/stop.sh" "$dir" >/dev/null || true
    exit 1
fi
echo "SLURM_CONF=$conf"
