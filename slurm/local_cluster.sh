#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests and for trying the sbatch
# scripts: munged, slurmctld and slurmd from Debian's slurm-wlm + munge, run as root.
#
#   slurm/local_cluster.sh up      # idempotent: writes the config, starts what is not running, waits for the node
#   slurm/local_cluster.sh down    # stops the daemons it started (by their pid files)
#   slurm/local_cluster.sh status  # exit code 0 when munged, slurmctld and slurmd all run
#
# The node line comes from `slurmd -C` (this machine's real CPUs and memory). The
# config goes to /etc/slurm/slurm.conf, where sbatch/srun/scontrol look; a slurm.conf
# this script did not write is never touched. Daemon state and logs live in $STATE_DIR.
set -euo pipefail

STATE_DIR=${SLIPSTREAM_SLURM_DIR:-/var/lib/slipstream-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by slipstream slurm/local_cluster.sh"
MUNGE_PID=/run/munge/munged.pid
conf_changed=0

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    echo "local_cluster.sh: $CONF exists and was not written by this script; not touching it" >&2
    exit 1
  fi
  local host node
  host=$(hostname -s)
  # "NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105": this machine as slurmd sees it.
  node=$(slurmd -C | head -n 1)
  mkdir -p /etc/slurm "$STATE_DIR/ctld" "$STATE_DIR/d"
  cat > "$CONF.new" <<EOF
$MARKER
ClusterName=slipstream
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No cgroups in containers and CI machines: track processes by parent, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# A requeued job may start again once its old credential expires (default 120 s), and
# waits for the next scheduling pass (default up to 60 s): short here, for tests.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF.new" "$CONF"; then
    rm "$CONF.new"
  else
    mv "$CONF.new" "$CONF"
    conf_changed=1
  fi
}

stop() {  # stop <pid file>
  if running "$1"; then
    local pid
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}

up() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null || {
    echo "local_cluster.sh: needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)" >&2; exit 1; }
  write_conf
  if ! running "$MUNGE_PID"; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || mungekey --create
    runuser -u munge -- munged
  fi
  if [ "$conf_changed" = 1 ]; then  # `scontrol reconfigure` leaves some settings (cred_expire) as they were
    stop "$STATE_DIR/slurmd.pid"
    stop "$STATE_DIR/slurmctld.pid"
  fi
  running "$STATE_DIR/slurmctld.pid" || slurmctld
  running "$STATE_DIR/slurmd.pid" || slurmd
  local node
  node=$(hostname -s)
  for _ in $(seq 60); do
    if sinfo -h -n "$node" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "local_cluster.sh: node $node is up"; return 0
    fi
    # A node left down or drained by an earlier run of the daemons comes back here.
    scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
    sleep 1
  done
  echo "local_cluster.sh: the node did not come up; see $STATE_DIR/*.log" >&2
  sinfo >&2 || true
  exit 1
}

down() {
  stop "$STATE_DIR/slurmd.pid"
  stop "$STATE_DIR/slurmctld.pid"
  stop "$MUNGE_PID"
}

status() {  # exit code 0 when all three daemons run, 3 otherwise
  local code=0
  for pidfile in "$MUNGE_PID" "$STATE_DIR/slurmctld.pid" "$STATE_DIR/slurmd.pid"; do
    if running "$pidfile"; then echo "running: $pidfile"; else echo "stopped: $pidfile"; code=3; fi
  done
  sinfo 2>/dev/null || true
  return "$code"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
