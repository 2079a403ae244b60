#!/usr/bin/env bash
# Installs what the test suite needs (when missing) and runs every test.
# Usage: ./scripts/test.sh            (as root on a fresh Debian/Ubuntu machine, or as a
#                                      user on a machine that already has the tools)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v python3 >/dev/null || need+=(python3)
command -v setpriv >/dev/null || need+=(util-linux)
# The multi-node test bed (scripts/nodes/): ip netns, nsenter, unshare, setsid.
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
command -v useradd >/dev/null || need+=(passwd)
command -v javac >/dev/null || need+=(default-jdk-headless)
command -v make >/dev/null || need+=(make)
command -v bash >/dev/null || need+=(bash)
command -v redis-server >/dev/null || need+=(redis-server)
command -v mpicc.openmpi >/dev/null || need+=(openmpi-bin libopenmpi-dev)
command -v mpicc.mpich >/dev/null || need+=(mpich libmpich-dev)
# A one-node Slurm for tests/slurm.rs (scripts/slurm/start.sh); the daemons live in sbin.
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
have munged || need+=(munge)
have slurmctld || need+=(slurmctld)
have slurmd || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "installing test dependencies: ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    else
        echo "missing test dependencies: ${need[*]} (run this script as root to install them)" >&2
        exit 1
    fi
fi

cargo build --workspace --all-targets
cargo test --workspace -- --test-threads="${STASIS_TEST_THREADS:-2}"
