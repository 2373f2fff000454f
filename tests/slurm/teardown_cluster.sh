#!/usr/bin/env bash
# Stop the SLURM daemons that tests/slurm/setup_cluster.sh started (and only those).
# Not used by CI.  Leaves packages, /etc/slurm/slurm.conf, the munge key and the
# state/log directories in place, so setup_cluster.sh can bring the cluster back.
#
# Usage (as root):  bash tests/slurm/teardown_cluster.sh
set -uo pipefail

STATE_DIR=/run/gradspace-slurm
if [[ ! -d $STATE_DIR ]]; then
    echo "teardown_cluster.sh: nothing recorded in $STATE_DIR; nothing to stop."
    exit 0
fi

# slurmd first (it may be running jobs), then the controller, then munged.
for name in slurmd slurmctld munged; do
    pidfile=$STATE_DIR/$name.pid
    [[ -s $pidfile ]] || continue
    pid=$(cat "$pidfile")
    # Only signal the process if it still is the daemon we started.
    if [[ -r /proc/$pid/comm ]] && [[ $(cat "/proc/$pid/comm") == "$name" ]]; then
        echo "stopping $name (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 1 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "warning: $name (pid $pid) still running after 10 s" >&2
            continue
        fi
    else
        echo "$name (pid $pid) is not running any more"
    fi
    rm -f "$pidfile"
done
rmdir "$STATE_DIR" 2>/dev/null || true
