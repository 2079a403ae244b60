# Shared by scripts/slurm/start.sh (a one-node cluster) and start-bed.sh (a cluster on
# the nodes of a test bed): checks, munge, and small helpers. Sourced with $1 = DIR;
# sets dir, sock (munge's socket), pids (the pid list) and exports
# STASIS_SLURM_CLUSTER=DIR (stop.sh finds the cluster's processes by it) and
# SLURM_CONF=DIR/slurm.conf; leaves the caller in DIR with munged running.

die() { echo "slurm/$(basename "$0"): $*" >&2; exit 1; }
# The daemons and mungekey are in sbin, which a plain user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

[ "$(id -u)" -eq 0 ] || die "must run as root (munged runs as the munge user, slurmd as root)"
for c in munged mungekey slurmctld slurmd sinfo scontrol setpriv; do
    command -v "$c" >/dev/null ||
        die "$c not found: install munge slurmctld slurmd slurm-client (scripts/test.sh does)"
done
id munge >/dev/null 2>&1 || die "no user munge (the munge package creates it)"

slurm_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
dir="$(cd "$1" && pwd)"
case "$dir" in *[[:space:]=,]*) die "DIR must not contain spaces, '=' or ',': $dir" ;; esac

# Leftovers of a previous cluster in DIR: stopped (only what it started), then removed.
"$slurm_here/stop.sh" "$dir" >/dev/null
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

# The node line as slurmd sees this machine (CPUs, sockets, cores, memory).
node="$(slurmd -C 2>/dev/null | head -n 1)"
case "$node" in NodeName=*) ;; *) die "slurmd -C printed no node line: $node" ;; esac
node="${node%% UpTime=*}"
nodename="${node#NodeName=}"
nodename="${nodename%% *}"
# The node's hardware alone (CPUs=... RealMemory=...), for other node names.
hardware="${node#NodeName=* }"

# The slurm.conf settings both test clusters share (every path under DIR): what the
# daemons run as, munge, the controller's files, and the tuning for fast tests.
conf_settings() {
    cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock,cred_expire=10
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
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
CONF
}
