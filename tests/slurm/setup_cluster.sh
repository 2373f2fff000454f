#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster (slurmctld + slurmd + munge) on this
# Debian machine, for the gradspace SLURM tests and CI.
#
# Usage (as root):  bash tests/slurm/setup_cluster.sh
#
# Idempotent: if `sinfo` already answers and the node is usable, it does nothing.
# It never stops or reconfigures daemons it did not start, and it refuses to
# overwrite an /etc/slurm/slurm.conf that it did not write (set
# GRADSPACE_SLURM_FORCE_CONF=1 to override).  No systemd is needed: the daemons
# are started directly.  Daemons started here are recorded in $STATE_DIR so that
# tests/slurm/teardown_cluster.sh stops only those.
#
# Environment knobs (all optional):
#   GRADSPACE_SLURM_CLUSTER   ClusterName               (default: gradspace)
#   GRADSPACE_SLURM_MEM_HEADROOM_MB  memory kept back from RealMemory (default: 1024)
#   GRADSPACE_SLURM_TIMEOUT   seconds to wait for the node to become idle (default: 90)
set -euo pipefail

START_SECONDS=$SECONDS
CLUSTER_NAME=${GRADSPACE_SLURM_CLUSTER:-gradspace}
MEM_HEADROOM_MB=${GRADSPACE_SLURM_MEM_HEADROOM_MB:-1024}
WAIT_TIMEOUT=${GRADSPACE_SLURM_TIMEOUT:-90}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# gradspace-test-cluster: written by tests/slurm/setup_cluster.sh"
STATE_DIR=/run/gradspace-slurm
LOG_DIR=/var/log/slurm

log() { printf '[setup_cluster %3ds] %s\n' "$((SECONDS - START_SECONDS))" "$*"; }

diagnostics() {
    echo "=================== SLURM diagnostics ===================" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [[ -f $f ]]; then
            echo "----- tail -n 40 $f -----" >&2
            tail -n 40 "$f" >&2 || true
        fi
    done
    echo "----- processes -----" >&2
    ps -eo pid,user,args | grep -E '[m]unged|[s]lurmctld|[s]lurmd' >&2 || true
    if command -v sinfo >/dev/null 2>&1; then
        echo "----- sinfo -----" >&2
        timeout 10 sinfo -N -l >&2 || true
        timeout 10 scontrol show node >&2 || true
    fi
    echo "=========================================================" >&2
}

die() {
    echo "setup_cluster.sh: ERROR: $*" >&2
    diagnostics
    exit 1
}

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The slurm.conf this script wants, written to $1 (also sets HOST, NCPU, REAL_MB,
# SLURM_USER).  Compared with the installed file: an outdated configuration written
# by an older version of this script is replaced and the daemons started here are
# restarted with it.
wanted_conf() {
HOST=$(hostname -s)
getent hosts "$HOST" >/dev/null || die "hostname '$HOST' does not resolve (add it to /etc/hosts)"
NCPU=$(nproc)
TOTAL_MB=$(free -m | awk '/^Mem:/ {print $2}')
REAL_MB=$((TOTAL_MB - MEM_HEADROOM_MB))
((REAL_MB >= 512)) || REAL_MB=$((TOTAL_MB * 3 / 4))
SLURM_USER=root
id slurm >/dev/null 2>&1 && SLURM_USER=slurm
cat >"$1" <<EOF
$MARKER
# Single-node test cluster: no accounting, no cgroups.  Memory and time limits are
# enforced without cgroups: jobacct_gather/linux samples each step's processes every
# second and OverMemoryKill kills a step above its --mem (job state OUT_OF_MEMORY);
# slurmctld ends jobs past their -t limit (TIMEOUT, checked about every 30 s).
ClusterName=$CLUSTER_NAME
SlurmctldHost=$HOST
SlurmUser=$SLURM_USER
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
ReturnToService=2
# Trust the node line below instead of draining the node when the detected
# hardware differs slightly (sandboxed/virtual machines report odd topologies).
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
OverTimeLimit=0
JobCompType=jobcomp/none
# Keep finished jobs visible to squeue/scontrol for a while (there is no sacct).
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$REAL_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

# True unless /etc/slurm/slurm.conf is ours and differs from what we would write now.
conf_current() {
    [[ -f $CONF ]] && grep -qF "$MARKER" "$CONF" || return 0
    local want
    want=$(mktemp)
    wanted_conf "$want"
    if cmp -s "$want" "$CONF"; then rm -f "$want"; return 0; fi
    rm -f "$want"
    return 1
}

# True when the controller answers and at least one node is usable.
cluster_usable() {
    command -v sinfo >/dev/null 2>&1 || return 1
    # Our own config but no controller running: skip sinfo's ~10 s connect timeout.
    if [[ -f $CONF ]] && grep -qF "$MARKER" "$CONF" && ! running /run/slurmctld.pid; then
        return 1
    fi
    local states
    states=$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null) || return 1
    grep -qE '^(idle|mixed|allocated|completing)' <<<"$states"
}

if cluster_usable && conf_current; then
    log "SLURM already answers sinfo with a usable node; nothing to do."
    sinfo
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages and starts daemons)"

# ---------------------------------------------------------------- packages
PKGS=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/gradspace-slurm-apt.log 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update >>/tmp/gradspace-slurm-apt.log 2>&1 || true
        apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/gradspace-slurm-apt.log 2>&1 \
            || { tail -n 30 /tmp/gradspace-slurm-apt.log >&2; die "apt-get install ${missing[*]} failed"; }
    fi
    log "packages installed"
else
    log "packages already installed"
fi

mkdir -p "$STATE_DIR"

# ---------------------------------------------------------------- munge
# munged refuses to start when its directories are group/world writable or owned
# by someone else, so fix ownership and modes explicitly.
id munge >/dev/null 2>&1 || die "user 'munge' missing after installing munge"
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0700 /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force \
        || die "munged failed to start"
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    munge -n | unmunge >/dev/null || die "munge round trip failed"
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid" 2>/dev/null \
        || pgrep -u munge -x munged | head -n1 >"$STATE_DIR/munged.pid"
fi

# ---------------------------------------------------------------- slurm.conf
if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF" && [[ ${GRADSPACE_SLURM_FORCE_CONF:-0} != 1 ]]; then
    die "$CONF exists and was not written by this script; refusing to overwrite (GRADSPACE_SLURM_FORCE_CONF=1 to force)"
fi

mkdir -p "$CONF_DIR"
new_conf=$(mktemp)
wanted_conf "$new_conf"
if [[ -f $CONF ]] && cmp -s "$new_conf" "$CONF"; then
    rm -f "$new_conf"
    log "$CONF unchanged"
else
    [[ -f $CONF ]] && CONF_CHANGED=1
    install -m 0644 "$new_conf" "$CONF"
    rm -f "$new_conf"
    log "wrote $CONF (CPUs=$NCPU RealMemory=${REAL_MB}MB host=$HOST user=$SLURM_USER)"
fi
# Debian's slurmd reads cgroup.conf when present; none of our plugins need it.

install -d -o "$SLURM_USER" -g "$SLURM_USER" -m 0755 /var/spool/slurmctld "$LOG_DIR"
install -d -o root -g root -m 0755 /var/spool/slurmd
touch "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmctld.log"
chown "$SLURM_USER":"$SLURM_USER" "$LOG_DIR/slurmctld.log"

# ---------------------------------------------------------------- daemons
# A changed configuration (e.g. other plugins) needs a restart; only daemons that this
# script started (recorded in $STATE_DIR) are restarted, slurmd first.  slurmctld keeps
# its job state in StateSaveLocation across the restart.
if [[ ${CONF_CHANGED:-0} == 1 ]]; then
    for name in slurmd slurmctld; do
        running /run/$name.pid || continue
        pid=$(cat /run/$name.pid)
        if [[ -s $STATE_DIR/$name.pid && $(cat "$STATE_DIR/$name.pid") == "$pid" ]]; then
            log "restarting $name (pid $pid) for the new configuration"
            kill -TERM "$pid"
            for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -0 "$pid" 2>/dev/null && die "$name (pid $pid) did not stop"
        else
            log "warning: $name (pid $pid) was not started by this script; running scontrol reconfigure"
            scontrol reconfigure || true
        fi
    done
fi

if running /run/slurmctld.pid; then
    log "slurmctld already running (pid $(cat /run/slurmctld.pid))"
else
    log "starting slurmctld"
    slurmctld -f "$CONF" || die "slurmctld failed to start"
    for _ in $(seq 1 20); do running /run/slurmctld.pid && break; sleep 0.5; done
    running /run/slurmctld.pid || die "slurmctld exited right after starting"
    cp /run/slurmctld.pid "$STATE_DIR/slurmctld.pid"
fi

if running /run/slurmd.pid; then
    log "slurmd already running (pid $(cat /run/slurmd.pid))"
else
    log "starting slurmd"
    slurmd -f "$CONF" || die "slurmd failed to start"
    for _ in $(seq 1 20); do running /run/slurmd.pid && break; sleep 0.5; done
    running /run/slurmd.pid || die "slurmd exited right after starting"
    cp /run/slurmd.pid "$STATE_DIR/slurmd.pid"
fi

# ---------------------------------------------------------------- wait for idle
log "waiting up to ${WAIT_TIMEOUT}s for node $HOST to become idle"
deadline=$((SECONDS + WAIT_TIMEOUT))
while :; do
    state=$(timeout 10 sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1 || true)
    case $state in
        idle* | mixed* | allocated*) break ;;
        down* | drain* | drained* | fail*)
            log "node state '$state'; resuming"
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
            ;;
    esac
    ((SECONDS < deadline)) || die "node $HOST did not become idle (last state: '${state:-no answer}')"
    sleep 1
done
log "node $HOST is $state"

# ---------------------------------------------------------------- smoke jobs
log "smoke test: srun"
out=$(timeout 60 srun -N1 -n1 -t 1 --mem=64 hostname 2>&1) || die "srun smoke job failed: $out"
[[ $out == "$HOST"* ]] || log "warning: srun printed '$out' (expected $HOST)"

log "smoke test: sbatch --wait"
smoke_dir=$(mktemp -d)
timeout 90 sbatch --wait -N1 -n1 -t 1 --mem=64 -J gradspace-smoke -o "$smoke_dir/out.txt" \
    --wrap 'echo smoke-ok' >"$smoke_dir/sbatch.txt" 2>&1 \
    || die "sbatch --wait smoke job failed: $(cat "$smoke_dir/sbatch.txt")"
grep -q smoke-ok "$smoke_dir/out.txt" || die "sbatch smoke job produced no output"
rm -rf "$smoke_dir"

sinfo
log "SLURM cluster '$CLUSTER_NAME' is up on $HOST (${NCPU} CPUs, ${REAL_MB} MB) in $((SECONDS - START_SECONDS))s"
