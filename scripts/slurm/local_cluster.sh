#!/usr/bin/env bash
# A private one-node SLURM cluster on this machine (slurmctld + slurmd on 127.0.0.1, munge for
# auth), to try the sbatch scripts and pipeline.sh before a real cluster. The test suite uses it
# (tests/launch/conftest.py).
#
#   scripts/slurm/local_cluster.sh up DIR [--cpus N]   # start; prints the SLURM_CONF to export
#   export SLURM_CONF=DIR/slurm.conf                   # then sbatch/squeue/scontrol use it
#   scripts/slurm/local_cluster.sh down DIR            # stop what `up` started (its pid files)
#
# Needs Debian's slurm-wlm and munge packages (apt-get install -y slurm-wlm munge) and root:
# slurmd runs jobs as the submitting user, which it can only do as root. Nothing outside DIR is
# used or changed: its own munge key and socket, slurm.conf with two free TCP ports, state and
# spool directories, pid and log files; the system's munge and slurm services (if any) are left
# alone. Node "mgnode" (127.0.0.1), partition "debug", ProctrackType=proctrack/linuxproc,
# SelectType=select/cons_tres, no accounting. `up` waits until sinfo shows the node idle.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d'; }
die() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 2 ]] || { usage >&2; exit 2; }
action="$1"
dir="$2"
shift 2
cpus="$(nproc)"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpus) cpus="${2:?--cpus needs a number}"; shift 2 ;;
        *) die "unknown argument '$1'" ;;
    esac
done

# A TCP port nobody listens on (bash's /dev/tcp connect fails), from a range away from the
# defaults (6817/6818) and from torchrun's 29500.
free_port() {
    local port
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 9000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "no free TCP port found in 20000-28999"
}

write_config() {
    local ctld_port slurmd_port
    ctld_port="$(free_port)"
    slurmd_port="$(free_port)"
    while [[ "$slurmd_port" == "$ctld_port" ]]; do slurmd_port="$(free_port)"; done
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
    cat > "$dir/slurm.conf" <<EOF
# Written by scripts/slurm/local_cluster.sh: a private one-node cluster.
ClusterName=mglocal
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s); 10 s keeps tries quick.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=mgnode NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=mgnode Default=YES MaxTime=INFINITE State=UP
EOF
}

# pid from a pid file, only if that process is still the one we started (its command line names
# our directory or our config), so `down` never signals a stranger that reused the pid.
our_pid() {
    local file="$1" pid
    [[ -f "$file" ]] || return 1
    pid="$(cat "$file")"
    [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "$dir" || return 1
    echo "$pid"
}

start() {
    local tool
    for tool in slurmctld slurmd munged sinfo; do
        command -v "$tool" >/dev/null || die "$tool not found: apt-get install -y slurm-wlm munge (as root)"
    done
    [[ "$(id -u)" == 0 ]] || die "slurmd must run as root to start jobs (run as root)"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    [[ -f "$dir/slurm.conf" ]] || write_config
    chmod 700 "$dir/munge"
    if [[ ! -f "$dir/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    if ! our_pid "$dir/munge/munged.pid" >/dev/null; then
        munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
            --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
            --seed-file="$dir/munge/munged.seed"
    fi
    export SLURM_CONF="$dir/slurm.conf"
    our_pid "$dir/slurmctld.pid" >/dev/null || slurmctld -f "$SLURM_CONF"
    our_pid "$dir/slurmd.pid" >/dev/null || slurmd -f "$SLURM_CONF" -N mgnode
    local state=""
    for _ in $(seq 120); do
        state="$(sinfo -h -n mgnode -o '%T' 2>/dev/null || true)"
        if [[ "$state" == idle ]]; then
            echo "local SLURM cluster up in $dir (node mgnode idle, $cpus CPUs); now run:"
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "error: node mgnode is '${state:-not reported}' after 60 s; logs: $dir/log" >&2
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    exit 1
}

stop() {
    [[ -d "$dir" ]] || die "$dir does not exist"
    dir="$(cd "$dir" && pwd)"
    export SLURM_CONF="$dir/slurm.conf"
    if our_pid "$dir/slurmctld.pid" >/dev/null; then
        # Cancel this cluster's jobs and give their processes (under our slurmd) time to end.
        scancel --quiet --partition=debug 2>/dev/null || true
        for _ in $(seq 60); do
            [[ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    local file pid
    for file in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        pid="$(our_pid "$file")" || continue
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    echo "local SLURM cluster in $dir stopped"
}

case "$action" in
    up) start ;;
    down) stop ;;
    *) usage >&2; exit 2 ;;
esac
