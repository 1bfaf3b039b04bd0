#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for CI and for trying the sbatch script.
#
#   cluster/slurm/local-cluster.sh install          # Debian/Ubuntu, as root: slurm-wlm + munge
#   cluster/slurm/local-cluster.sh start STATE_DIR  # munged, slurmctld, slurmd; prints SLURM_CONF=...
#   export SLURM_CONF=STATE_DIR/slurm.conf          # then sinfo, sbatch, squeue, scontrol work
#   cluster/slurm/local-cluster.sh stop STATE_DIR   # stops those three daemons, by their pid files
#
# Several nodes, on hosts made by cluster/local/hosts.sh (network namespaces with their own
# hostname and address, the file system shared):
#   cluster/slurm/local-cluster.sh start STATE_DIR HOST=ADDRESS HOST=ADDRESS ...
# slurmctld and one slurmd run on the first host, one slurmd on each other host (NodeName =
# the host's name, NodeAddr = its address, 1 CPU each); the one munged's socket is on the
# shared file system (on a real cluster every node runs munged with the same key). The Slurm
# commands then work on those hosts: cluster/local/hosts.sh exec HOST sbatch ...
#
# Everything is private to STATE_DIR: its own munge key and socket, free ports for slurmctld
# and slurmd, state, spool, logs and pid files. Nothing under /etc is changed, no system
# service is started, and a Slurm or munge already running on the machine is left alone.
# The daemons run as root (SlurmUser=root): this is a test cluster, not a template for a
# production slurm.conf.
set -euo pipefail

die() { echo "local-cluster.sh: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        echo "slurm and munge are already installed"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "installing needs root (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null || die "no apt-get here: install Slurm (slurmctld, slurmd, sbatch) and munge by other means"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("0.0.0.0", 0)); print(s.getsockname()[1])'
}

start() {
    local dir="$1"
    shift
    local hosts=("$@") run_on=() ctl_host ctl_addr hosts_sh=""
    for cmd in munged mungekey slurmctld slurmd sinfo; do
        command -v "$cmd" >/dev/null || die "$cmd not found: run '$0 install' first (as root)"
    done
    [[ $(id -u) -eq 0 ]] || die "the daemons of this test cluster run as root"
    [[ ! -e "$dir/slurm.conf" ]] || die "$dir/slurm.conf exists: a cluster from this state dir may be running; stop it first"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    # munged refuses a socket directory that is not searchable by all, or writable by others.
    chmod 755 "$dir"
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
    chmod 755 "$dir/munge"
    local sock="$dir/munge/munge.sock"
    # unix socket paths are limited to 107 bytes
    (( ${#sock} < 100 )) || die "state dir path too long for a unix socket ($sock); use a shorter one, e.g. under /tmp"

    mungekey --create --keyfile="$dir/munge/munge.key"
    chmod 600 "$dir/munge/munge.key"
    munged --socket="$sock" --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    munge -S "$sock" -n | unmunge -S "$sock" >/dev/null || die "munged does not answer; see $dir/log/munged.log"

    local node cpus mem node_lines nodes spec
    node="$(hostname -s)"
    # This machine's own node line, e.g. "NodeName=vm CPUs=2 ... RealMemory=24105"
    read -r cpus mem < <(slurmd -C | head -1 | sed -E 's/.*CPUs=([0-9]+).*RealMemory=([0-9]+).*/\1 \2/')
    if [[ ${#hosts[@]} -eq 0 ]]; then
        ctl_host="$node" ctl_addr=127.0.0.1 nodes="$node"
        mkdir -p "$dir/spool/$node"
        node_lines="NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN"
    else
        hosts_sh="$(cd "$(dirname "${BASH_SOURCE[0]}")/../local" && pwd)/hosts.sh"
        node_lines="" nodes=""
        for spec in "${hosts[@]}"; do
            [[ "$spec" =~ ^([A-Za-z0-9-]+)=([0-9.]+)$ ]] || die "'$spec' is not HOST=ADDRESS"
            node_lines+="${node_lines:+$'\n'}NodeName=${BASH_REMATCH[1]} NodeAddr=${BASH_REMATCH[2]} CPUs=1"
            node_lines+=" RealMemory=$(( mem / ${#hosts[@]} )) State=UNKNOWN"
            nodes+="${nodes:+,}${BASH_REMATCH[1]}"
            mkdir -p "$dir/spool/${BASH_REMATCH[1]}"
        done
        ctl_host="${hosts[0]%%=*}" ctl_addr="${hosts[0]#*=}"
        run_on=("$hosts_sh" exec "$ctl_host")
    fi
    cat > "$dir/slurm.conf" <<EOF
# Single-node test cluster written by cluster/slurm/local-cluster.sh
ClusterName=ptftlocal
SlurmctldHost=${ctl_host}(${ctl_addr})
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
# keep finished jobs visible to scontrol for 10 minutes (there is no accounting database)
MinJobAge=600
# job ids from a random start: two test clusters on one machine then give their jobs different
# Ray ports and temp dirs (ptft.sbatch derives both from the job id)
FirstJobId=$(( (RANDOM << 8 | RANDOM) % 900000 + 1000 ))
# seconds between SIGTERM and SIGKILL for a job step's processes (default 30): Ray's GCS
# ignores SIGTERM, so this is what tearing down the Ray nodes of a job costs
KillWait=5
${node_lines}
PartitionName=local Nodes=${nodes} Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    "${run_on[@]}" slurmctld -f "$SLURM_CONF"
    if [[ ${#hosts[@]} -eq 0 ]]; then
        slurmd -f "$SLURM_CONF" -N "$node"
    else
        for spec in "${hosts[@]}"; do
            "$hosts_sh" exec "${spec%%=*}" slurmd -f "$SLURM_CONF" -N "${spec%%=*}"
        done
    fi
    local states="" want
    want="$(tr ',' '\n' <<<"$nodes" | wc -l)"
    for _ in $(seq 60); do
        states="$("${run_on[@]}" sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)"
        [[ "$(grep -o '=idle' <<<"$states" | wc -l)" -eq "$want" ]] && break
        sleep 1
    done
    if [[ "$(grep -o '=idle' <<<"$states" | wc -l)" -ne "$want" ]]; then
        echo "--- slurmctld.log"; tail -20 "$dir/log/slurmctld.log" 2>/dev/null || true
        echo "--- slurmd logs"; tail -n 20 "$dir"/log/slurmd-*.log 2>/dev/null || true
        stop "$dir"
        die "not all of $nodes became idle within 60 s (states: '${states:-none}')"
    fi
    echo "SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {
    local name="$1" pidfile="$2" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    # Only the process the pid file names, and only if it is still that daemon.
    if [[ -n "$pid" ]] && grep -q "$name" "/proc/$pid/comm" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop() {
    local dir="$1"
    [[ -d "$dir" ]] || { echo "no $dir; nothing to stop"; return 0; }
    local f
    for f in "$dir"/slurmd-*.pid; do [[ -e "$f" ]] && stop_pidfile slurmd "$f"; done
    stop_pidfile slurmctld "$dir/slurmctld.pid"
    stop_pidfile munged "$dir/munge/munged.pid"
    rm -f "$dir/slurm.conf"
    echo "stopped the Slurm test cluster in $dir"
}

case "${1:-}" in
    install) install_packages ;;
    start) [[ $# -ge 2 ]] || die "usage: $0 start STATE_DIR [HOST=ADDRESS ...]"; shift; start "$@" ;;
    stop) [[ $# -eq 2 ]] || die "usage: $0 stop STATE_DIR"; stop "$2" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
