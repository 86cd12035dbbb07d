#!/usr/bin/env bash
# cluster.sh - krun's own multi-node Slurm lane on ONE machine (Debian slurm-wlm + munge).
#
#   cluster.sh up                 install packages if missing, create namespaces, start
#                                 munged + slurmctld + one slurmd per node, wait until idle
#   cluster.sh exec CMD...        run a Slurm client (srun, sbatch, salloc, sinfo, scontrol,
#                                 squeue, scancel) or any command on the "login node";
#                                 exit status and stdin/stdout/stderr are CMD's own
#   cluster.sh node-exec I CMD... run CMD "on" node I (its slurmd's net/UTS/mount namespaces)
#   cluster.sh status             daemons, namespaces, sinfo
#   cluster.sh down               stop only the daemons this script started (PID files checked
#                                 against their command line), delete its namespaces and route
#   cluster.sh install            only install the Debian packages
#
# Layout: every node is a network namespace "$PFX-node<i>" with address $NET.(10+i) on a
# bridge that lives in the controller namespace "$PFX-ctl" ($NET.1, hostname krunctl; slurmctld
# and munged run there, and 'exec' runs there too). Each daemon also gets a private UTS
# namespace (hostname node<i>) and mount namespace (our hosts file bind-mounted on /etc/hosts,
# so tasks resolve node1..nodeN). The host namespace gets NO address: $NET.0/24 exists only in
# our namespaces (which have no default route), and 'up' adds 'ip route add unreachable
# $NET.0/24' in the host namespace before anything starts, so a Slurm client run on the host by
# mistake fails locally instead of talking to the default gateway. 'down' removes it.
#
# Running a binary built on the host inside the cluster (for tests of krun's Slurm mode):
# only the network, hostname and /etc/hosts differ between nodes; the filesystem (/work,
# target/, /tmp, /var/tmp, /dev/shm), the process list and root are shared. So a test builds
# as usual and passes ABSOLUTE paths:
#
#     cluster-tests/slurm/cluster.sh up
#     cluster-tests/slurm/cluster.sh exec srun -N 3 --ntasks-per-node=1 "$PWD/target/debug/krun" ...
#     cluster-tests/slurm/cluster.sh exec sbatch -N 3 --wait -o /var/tmp/krun-slurm/jobs/%j.out job.sh
#     cluster-tests/slurm/cluster.sh down
#
# From Rust: Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/slurm/cluster.sh"))
#     .args(["exec", "srun", "-N", "3", env!("CARGO_BIN_EXE_<bin>")]) ...
# Inside tasks SLURM_STEP_NODELIST / SLURM_JOB_NODELIST name node1..nodeN, which resolve (via
# the bind-mounted /etc/hosts) to $NET.11.. . Write job output under $STATE/jobs (or any
# absolute path): the batch script runs on node1 with the submitter's working directory.
# Do not run srun/sbatch directly on the host: always go through 'exec'.
#
# Knobs (environment, all optional):
#   KRUN_SLURM_NODES=3            compute nodes (1..50)
#   KRUN_SLURM_CPUS=2             CPUs advertised per node (config_overrides: may exceed cores)
#   KRUN_SLURM_NET=10.201.0       first three octets of the private /24 (not 10.77.0: soft-RoCE)
#   KRUN_SLURM_STATE=/var/tmp/krun-slurm   config, keys, spool, pid files, logs, jobs/
#   KRUN_SLURM_PREFIX=krun-slurm  prefix of the namespace names
#   KRUN_SLURM_MSG_TIMEOUT=5      MessageTimeout; a killed slurmd is DOWN after ~3x this
#
# Needs root and Debian's slurmctld, slurmd, slurm-client, munge (installed by 'up'/'install').
# What cost time before (from ../../../shared/slurm): munge's socket dir must be mode 755;
# ProctrackType=proctrack/linuxproc + TaskPlugin=task/none + CgroupPlugin=cgroup/v1 because
# 'ip netns exec' remounts /sys without /sys/fs/cgroup; SlurmdParameters=config_overrides; one
# spool dir per node.
set -euo pipefail

SELF=$(readlink -f "$0")
STATE=${KRUN_SLURM_STATE:-/var/tmp/krun-slurm}
NNODES=${KRUN_SLURM_NODES:-3}
CPUS=${KRUN_SLURM_CPUS:-2}
NET=${KRUN_SLURM_NET:-10.201.0}
PFX=${KRUN_SLURM_PREFIX:-krun-slurm}
MSG_TIMEOUT=${KRUN_SLURM_MSG_TIMEOUT:-5}

CTL_NS=$PFX-ctl
CTL_HOST=krunctl
CTL_IP=$NET.1
CONF=$STATE/etc/slurm.conf
HOSTS=$STATE/etc/hosts
RUN=$STATE/run
LOG=$STATE/log
MUNGE_SOCK=$RUN/munge/munge.socket
PKGS=(slurmctld slurmd slurm-client munge)

log() { printf '[cluster.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
node_ns() { echo "$PFX-node$1"; }
node_ip() { echo "$NET.$((10 + $1))"; }
node_list() { if [ "$NNODES" -eq 1 ]; then echo node1; else echo "node[1-$NNODES]"; fi; }
ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF -- "$1"; }

[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, routes, slurmd as root)"
[[ $NNODES =~ ^[0-9]+$ ]] && [ "$NNODES" -ge 1 ] && [ "$NNODES" -le 50 ] || die "KRUN_SLURM_NODES must be 1..50"
[[ $NET =~ ^10\.[0-9]+\.[0-9]+$ ]] || die "KRUN_SLURM_NET must look like 10.X.Y"
[ "$NET" != 10.77.0 ] || die "10.77.0.0/24 is used by the soft-RoCE guest; pick another KRUN_SLURM_NET"

# ----------------------------------------------------------------- packages --
cmd_install() {
    local missing=() p i
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
    done
    command -v ip >/dev/null || missing+=(iproute2)
    command -v unshare >/dev/null || missing+=(util-linux)
    [ ${#missing[@]} -gt 0 ] || return 0
    log "installing ${missing[*]}"
    for i in 1 2 3 4 5 6; do   # apt may be locked by another process: wait and retry
        if DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=120 update >/dev/null &&
            DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=120 install -y \
                --no-install-recommends "${missing[@]}" >/dev/null; then
            return 0
        fi
        log "apt-get failed (attempt $i/6), retrying in 10 s"; sleep 10
    done
    die "could not install ${missing[*]}"
}

# ---------------------------------------------------------- process helpers --
# pid_of PIDFILE MARKER: print the PID if it is alive and its command line contains MARKER
# (our config or socket path), so we never signal a process we did not start.
pid_of() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(head -n1 "$1" | tr -dc 0-9)
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
    echo "$pid"
}
# running PID: alive and not a zombie (init reaps our daemons late here)
running() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }
# stop MARKER PIDFILE...: SIGTERM each by PID, wait up to 10 s, SIGKILL the rest by PID
stop() {
    local marker=$1 f pid pids=() i alive; shift
    for f in "$@"; do
        [ -e "$f" ] || continue
        if pid=$(pid_of "$f" "$marker"); then
            log "stopping $(basename "$f" .pid) (pid $pid)"; kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$f"
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    for i in $(seq 50); do
        alive=()
        for pid in "${pids[@]}"; do running "$pid" && alive+=("$pid"); done
        [ ${#alive[@]} -gt 0 ] || return 0
        sleep 0.2
    done
    log "SIGKILL ${alive[*]}"; kill -KILL "${alive[@]}" 2>/dev/null || true
}
# wait_until SECONDS WHAT CMD...: poll CMD every 0.2 s, bounded
wait_until() {
    local secs=$1 what=$2 i; shift 2
    for i in $(seq $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "timed out after ${secs}s waiting for $what (logs in $LOG)"
}

# in_ns NETNS HOSTNAME CMD...: CMD in NETNS with its own hostname and our /etc/hosts.
# With REPLACE=1 the script process becomes CMD (signals and exit status go straight to it).
in_ns() {
    local ns=$1 h=$2; shift 2
    local outer
    outer="$(readlink /proc/self/ns/uts) $(readlink /proc/self/ns/mnt)"
    if [ "${REPLACE:-0}" = 1 ]; then
        KRUN_SLURM_OUTER=$outer exec ip netns exec "$ns" unshare --uts --mount --propagation private -- "$SELF" __enter "$h" "$@" 9>&-
    fi
    KRUN_SLURM_OUTER=$outer ip netns exec "$ns" unshare --uts --mount --propagation private -- "$SELF" __enter "$h" "$@" 9>&-
}
exec_in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@" 9>&-; }  # 9 = the up/down lock: daemons must not inherit it
cx() { in_ns "$CTL_NS" "$CTL_HOST" "$@"; }

# ------------------------------------------------------------------ network --
net_up() {
    local i ns
    # Guard first, before any namespace or daemon exists (see the header).
    if [ ! -s "$STATE/host-route" ]; then
        if [ -n "$(ip -4 route show to match "$NET.0/24" | grep -v '^default' || true)" ]; then
            die "the host already routes $NET.0/24 ($(ip -4 route show to match "$NET.0/24" | grep -v '^default' | head -n1)); pick another KRUN_SLURM_NET"
        fi
        ip route add unreachable "$NET.0/24"
        echo "$NET.0/24" >"$STATE/host-route"
    fi
    for ns in "$CTL_NS" $(for i in $(seq "$NNODES"); do node_ns "$i"; done); do
        ns_exists "$ns" || ip netns add "$ns"
        grep -qxF "$ns" "$STATE/netns.list" 2>/dev/null || echo "$ns" >>"$STATE/netns.list"
        ip -n "$ns" link set lo up
    done
    ip -n "$CTL_NS" link show br0 >/dev/null 2>&1 ||
        ip -n "$CTL_NS" link add br0 type bridge stp_state 0 forward_delay 0
    ip -n "$CTL_NS" addr replace "$CTL_IP/24" dev br0
    ip -n "$CTL_NS" link set br0 up
    for i in $(seq "$NNODES"); do
        ns=$(node_ns "$i")
        ip -n "$ns" link show eth0 >/dev/null 2>&1 ||
            ip -n "$CTL_NS" link add "vnode$i" type veth peer name eth0 netns "$ns"
        ip -n "$CTL_NS" link set "vnode$i" master br0 up
        ip -n "$ns" addr replace "$(node_ip "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
}

# ------------------------------------------------------------------- config --
write_config() {
    local i
    mkdir -p "$STATE"/{etc,munge,ctld,spool,run/munge,log,jobs}
    for i in $(seq "$NNODES"); do mkdir -p "$STATE/spool/node$i"; done
    chmod 700 "$STATE/munge"
    chmod 755 "$STATE" "$RUN" "$RUN/munge" "$LOG" "$STATE/spool" "$STATE/etc"
    chmod 1777 "$STATE/jobs"
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        echo "$CTL_IP $CTL_HOST"
        for i in $(seq "$NNODES"); do echo "$(node_ip "$i") node$i"; done
    } >"$HOSTS"
    cat >"$CONF" <<EOF
# generated by $SELF
ClusterName=krun
SlurmctldHost=$CTL_HOST($CTL_IP)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=5
SlurmctldTimeout=30
MessageTimeout=$MSG_TIMEOUT
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
EOF
    for i in $(seq "$NNODES"); do
        echo "NodeName=node$i NodeHostname=node$i NodeAddr=$(node_ip "$i") CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=1024 State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=batch Nodes=$(node_list) Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    echo "CgroupPlugin=cgroup/v1" >"$STATE/etc/cgroup.conf"
    chmod 644 "$CONF" "$HOSTS" "$STATE/etc/cgroup.conf"
    echo "$NNODES" >"$STATE/nnodes"
}

# ------------------------------------------------------------------ daemons --
munge_up() {
    local key=$STATE/munge/munge.key
    [ -s "$key" ] || mungekey --create --keyfile="$key" 2>/dev/null ||
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    chmod 400 "$key"
    pid_of "$RUN/munged.pid" "$MUNGE_SOCK" >/dev/null && return 0
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    # a unix socket on a path is reachable from every network namespace
    exec_in_ns "$CTL_NS" munged --socket="$MUNGE_SOCK" --key-file="$key" --pid-file="$RUN/munged.pid" \
        --log-file="$LOG/munged.log" --seed-file="$STATE/munge/seed"
    wait_until 10 "munged" test -S "$MUNGE_SOCK"
    munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK" >/dev/null || die "munge round trip failed"
}
ctld_up() {
    pid_of "$RUN/slurmctld.pid" "$CONF" >/dev/null && return 0
    cx slurmctld -f "$CONF" -i
    wait_until 30 "slurmctld" pid_of "$RUN/slurmctld.pid" "$CONF"
    wait_until 30 "scontrol ping" bash -c "'$SELF' exec scontrol ping | grep -q UP"
}
slurmd_up() {
    pid_of "$RUN/slurmd-node$1.pid" "$CONF" >/dev/null && return 0
    in_ns "$(node_ns "$1")" "node$1" slurmd -f "$CONF"
    wait_until 30 "slurmd node$1" pid_of "$RUN/slurmd-node$1.pid" "$CONF"
}
all_idle() {
    local out
    out=$(cx sinfo -h -N -o '%N %T') || return 1
    [ "$(grep -cE ' (idle|mixed|allocated)$' <<<"$out")" -eq "$NNODES" ]
}

cmd_up() {
    local t0=$SECONDS i
    cmd_install
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"; flock -w 120 9 || die "another up/down holds $STATE/.lock"
    if [ -s "$STATE/nnodes" ] && [ "$(cat "$STATE/nnodes")" != "$NNODES" ] &&
        pid_of "$RUN/slurmctld.pid" "$CONF" >/dev/null; then
        die "a cluster with $(cat "$STATE/nnodes") nodes is up; run '$0 down' first"
    fi
    write_config
    net_up
    munge_up
    ctld_up
    for i in $(seq "$NNODES"); do slurmd_up "$i"; done
    wait_until 60 "$NNODES nodes idle" all_idle
    log "up: $NNODES nodes ($(node_list), $NET.11..) in $((SECONDS - t0)) s; state in $STATE"
}

cmd_down() {
    local n ns pids i jobs
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"; flock -w 120 9 || die "another up/down holds $STATE/.lock"
    n=$(cat "$STATE/nnodes" 2>/dev/null || echo "$NNODES")
    if pid_of "$RUN/slurmctld.pid" "$CONF" >/dev/null; then
        jobs=$(cx squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs $jobs"
            # shellcheck disable=SC2086
            cx scancel $jobs 2>/dev/null || true
            for i in $(seq 25); do [ -z "$(cx squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
        fi
    fi
    stop "$CONF" "$RUN"/slurmd-*.pid "$RUN/slurmctld.pid"
    stop "$MUNGE_SOCK" "$RUN/munged.pid"
    # whatever still lives in OUR namespaces (slurmstepd, job tasks) was started through us
    for ns in $( { cat "$STATE/netns.list" 2>/dev/null; echo "$CTL_NS"; for i in $(seq "$n"); do node_ns "$i"; done; } | sort -u); do
        ns_exists "$ns" || continue
        for i in $(seq 10); do
            pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
            [ -n "${pids// /}" ] || break
            # shellcheck disable=SC2086
            if [ "$i" -lt 6 ]; then kill -TERM $pids 2>/dev/null || true; else kill -KILL $pids 2>/dev/null || true; fi
            sleep 0.2
        done
        ip netns del "$ns"
    done
    if [ -s "$STATE/host-route" ]; then
        ip route del unreachable "$(cat "$STATE/host-route")" 2>/dev/null || true
        rm -f "$STATE/host-route"
    fi
    rm -rf "$STATE"/{etc,munge,ctld,spool,run} "$STATE/netns.list" "$STATE/nnodes"
    log "down (logs and jobs/ kept in $STATE)"
}

cmd_status() {
    local f pid
    for f in "$RUN"/*.pid; do
        [ -e "$f" ] || continue
        if pid=$(pid_of "$f" "$STATE"); then echo "running $(basename "$f" .pid) pid $pid"; else echo "dead    $(basename "$f" .pid)"; fi
    done
    ip netns list | grep -E "^$PFX-" || true
    ip route show "$NET.0/24" || true
    if pid_of "$RUN/slurmctld.pid" "$CONF" >/dev/null; then cx sinfo -N -l; else echo "slurmctld not running"; fi
}

case "${1:-}" in
    __enter) # internal: inside 'ip netns exec NS unshare --uts --mount'
        shift; h=$1; shift
        outer=${KRUN_SLURM_OUTER:-}; unset KRUN_SLURM_OUTER
        # never rename the real host or cover its /etc/hosts
        [ -n "$outer" ] && [ "${outer% *}" != "$(readlink /proc/self/ns/uts)" ] || die "__enter outside a private UTS namespace"
        [ "${outer#* }" != "$(readlink /proc/self/ns/mnt)" ] || die "__enter outside a private mount namespace"
        unset REPLACE
        hostname "$h" 2>/dev/null || echo "$h" >/proc/sys/kernel/hostname
        mount --bind "$HOSTS" /etc/hosts
        export SLURM_CONF=$CONF
        exec "$@" ;;
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    exec) shift; [ $# -gt 0 ] || die "usage: $0 exec CMD..."
        pid_of "$RUN/slurmctld.pid" "$CONF" >/dev/null || die "cluster is not up (run '$0 up')"
        REPLACE=1 cx "$@" ;;
    node-exec) shift; i=${1:?usage: $0 node-exec I CMD...}; shift; [ $# -gt 0 ] || die "usage: $0 node-exec I CMD..."
        if pid=$(pid_of "$RUN/slurmd-node$i.pid" "$CONF"); then
            exec nsenter -t "$pid" --net --uts --mount -- env SLURM_CONF="$CONF" "$@"
        fi
        ns_exists "$(node_ns "$i")" || die "no node $i"
        REPLACE=1 in_ns "$(node_ns "$i")" "node$i" "$@" ;;
    *) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SELF"; exit 2 ;;
esac
