#!/usr/bin/env bash
# A one-node SLURM cluster on this machine: the real slurmctld and slurmd that the `slurm` tests (and a
# user trying `--launcher slurm`) submit to.
#
#   scripts/slurm-cluster.sh up       install what is missing, start munged/slurmctld/slurmd, wait for idle
#   scripts/slurm-cluster.sh down     stop the daemons this script started (by their pid files), nothing else
#   scripts/slurm-cluster.sh status   exit 0 when the node answers and is usable; prints sinfo
#   scripts/slurm-cluster.sh conf     print the slurm.conf path (export SLURM_CONF=$(... conf))
#
# Needs root (apt-get, slurmd). Debian/Ubuntu's packages: slurmctld slurmd slurm-client munge (22.05 on
# Debian 12). Everything else lives under $TLIT_SLURM_DIR (default /tmp/tlit-slurm): slurm.conf, spool,
# state, logs and pid files. Without systemd: the daemons are started directly.
#
# No accounting (no slurmdbd): the launcher tracks its jobs with squeue/scontrol, not sacct (see
# experiments/launchers/slurm.py). The scheduler is tuned for tests: a requeued job waits cred_expire
# seconds before it may start again (SLURM's default is 120 s), and the scheduler looks every 2 s.
#
# Idempotent: `up` on a running cluster only checks it; `down` twice is fine. `up` after a half-failed `up`
# starts what is missing.
set -euo pipefail

DIR=${TLIT_SLURM_DIR:-/tmp/tlit-slurm}
CONF=$DIR/slurm.conf
CPUS=${TLIT_SLURM_CPUS:-2}
REQUEUE_WAIT_S=${TLIT_SLURM_REQUEUE_WAIT_S:-5}
WAIT_S=${TLIT_SLURM_WAIT_S:-60}
PACKAGES=(slurmctld slurmd slurm-client munge)
ETC_CONF=/etc/slurm/slurm.conf

say() { echo "slurm-cluster: $*" >&2; }
die() {
    say "$*"
    exit 1
}

alive() { # alive PIDFILE NAME: the pid file names a running process whose command is NAME
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] && [[ $(</proc/$pid/comm) == "$2" ]]
}

node_state() { # the node's state as sinfo prints it (idle, mix, alloc, down*, drain...), or nothing
    SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -1
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them (Debian/Ubuntu: ${PACKAGES[*]})"
    say "installing ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

start_munge() {
    if munge_works; then return 0; fi # someone's munged (or ours from an earlier `up`) answers
    if [[ ! -s /etc/munge/munge.key ]]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$DIR/munged.pid"
    for _ in $(seq 50); do
        munge_works && return 0
        sleep 0.1
    done
    die "munged started but does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
    local host mem_mb
    host=$(hostname -s)
    mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.8 }' /proc/meminfo)
    ((CPUS <= $(nproc))) || CPUS=$(nproc)
    mkdir -p "$DIR"/{spool,state,log}
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm-cluster.sh: one node on this machine, for tests. Not for production.
ClusterName=tlit
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again after cred_expire seconds (SLURM's default: 120).
AuthInfo=cred_expire=$REQUEUE_WAIT_S
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=10
MinJobAge=600
InactiveLimit=0
Waittime=0
SlurmctldPort=${TLIT_SLURM_PORT:-6817}
SlurmdPort=$((${TLIT_SLURM_PORT:-6817} + 1))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
    # Plain `sbatch` in any shell finds the cluster, unless a slurm.conf of someone else's is already there.
    if [[ ! -e $ETC_CONF && ! -L $ETC_CONF ]]; then
        mkdir -p /etc/slurm
        ln -s "$CONF" "$ETC_CONF"
    fi
}

wait_usable() {
    local state=""
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(node_state)
        case $state in
        idle | mixed | allocated | completing) return 0 ;;
        down* | drain*) # down or drained in an earlier cluster: this one is fine
            SLURM_CONF=$CONF scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "the node is not idle after ${WAIT_S}s (state: ${state:-no answer}); logs: $DIR/log"
}

up() {
    [[ $(id -u) == 0 ]] || die "needs root (it installs packages and runs slurmd as root)"
    mkdir -p "$DIR"
    if alive "$DIR/slurmctld.pid" slurmctld && alive "$DIR/slurmd.pid" slurmd && [[ -s $CONF ]]; then
        wait_usable
        say "already up (SLURM_CONF=$CONF)"
        return 0
    fi
    install_packages
    start_munge
    alive "$DIR/slurmctld.pid" slurmctld || write_conf
    # -i: ignore state left by an earlier cluster in $DIR (its jobs are gone with its processes).
    alive "$DIR/slurmctld.pid" slurmctld || slurmctld -i -f "$CONF"
    alive "$DIR/slurmd.pid" slurmd || slurmd -f "$CONF"
    wait_usable
    say "up: $(node_state) node with $CPUS CPUs (SLURM_CONF=$CONF)"
}

stop() { # stop PIDFILE NAME: end the process only if the pid file still names NAME
    local pid
    alive "$1" "$2" || {
        rm -f "$1"
        return 0
    }
    pid=$(<"$1")
    kill -TERM "$pid"
    for _ in $(seq 100); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    [[ -d /proc/$pid ]] && kill -KILL "$pid"
    rm -f "$1"
}

cancel_jobs() { # the jobs on this cluster exist only because of it: end them before their slurmd
    local jobs
    alive "$DIR/slurmctld.pid" slurmctld || return 0
    jobs=$(SLURM_CONF=$CONF squeue -h -o '%A' 2>/dev/null) || return 0
    [[ -n $jobs ]] || return 0
    # shellcheck disable=SC2086  # one job id a word
    SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
    for _ in $(seq 30); do
        [[ -z $(SLURM_CONF=$CONF squeue -h -o '%A' -t running,completing 2>/dev/null) ]] && return 0
        sleep 0.5
    done
}

down() {
    cancel_jobs
    stop "$DIR/slurmd.pid" slurmd
    stop "$DIR/slurmctld.pid" slurmctld
    stop "$DIR/munged.pid" munged
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then rm -f "$ETC_CONF"; fi
    say "down"
}

status() {
    local state
    alive "$DIR/slurmctld.pid" slurmctld || {
        say "slurmctld is not running"
        return 1
    }
    alive "$DIR/slurmd.pid" slurmd || {
        say "slurmd is not running"
        return 1
    }
    SLURM_CONF=$CONF sinfo
    state=$(node_state)
    case $state in
    idle | mixed | allocated | completing) return 0 ;;
    *)
        say "node state: ${state:-no answer}"
        return 1
        ;;
    esac
}

case ${1:-} in
up) up ;;
down) down ;;
status) status ;;
conf) echo "$CONF" ;;
*) die "usage: $0 up|down|status|conf" ;;
esac
