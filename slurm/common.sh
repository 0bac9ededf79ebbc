# Sourced by the sbatch scripts: the run directory, the preemption trap and the requeue.
#
# Preemption: `#SBATCH --signal=B:USR1@90` signals only this batch shell, 90 s before
# the time limit. The trap passes USR1 on to the job step (srun hands it to torchrun,
# torchrun's --signals_to_handle to every worker); each worker saves a checkpoint at
# the next step boundary and exits 0 with "preempted": "SIGUSR1" in summary.json. Then
# this script requeues the job, and the next start resumes in the same run directory
# (trainer.resume=auto).

# Stable across requeues: the job id stays, so does the run directory.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
  REQUEUE_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
  REQUEUE_ID="$SLURM_JOB_ID"
fi
RUN_DIR=${RUN_DIR:-outputs/slurm/${SLURM_JOB_NAME:-job}-${REQUEUE_ID}}
PYTHON=${PYTHON:-python}
# Processes per node: GPUs by default; CPU runs (CI) set GPUS_PER_NODE and trainer.device=cpu.
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MAX_RESTARTS=${MAX_RESTARTS:-0}
# Same formula as launcher/topology.py: every node derives the same port from the job id.
RDZV_PORT=$((15000 + SLURM_JOB_ID % 15000))
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # restarts on gloo (pytorch #135712)

signalled=0
step_pid=
on_preemption_warning() {
  signalled=1
  echo "slurm: preemption warning (USR1), asking the run to checkpoint and stop" >&2
  [ -n "$step_pid" ] && kill -USR1 "$step_pid" 2>/dev/null
}
trap on_preemption_warning USR1

# run_step CMD...: runs the job step in the background so the trap can fire while it runs;
# returns its exit code once it has really ended.
run_step() {
  "$@" &
  step_pid=$!
  local status=0
  while :; do
    wait "$step_pid" && status=0 || status=$?
    kill -0 "$step_pid" 2>/dev/null || break  # wait returns early when a trapped signal arrives
  done
  return "$status"
}

# finish STATUS: requeue after a preemption that stopped the run early; otherwise exit with STATUS.
finish() {
  local status=$1
  if [ "$signalled" = 1 ] && ! run_is_complete; then
    echo "slurm: run stopped for preemption at a checkpoint; requeueing job $REQUEUE_ID" >&2
    scontrol requeue "$REQUEUE_ID" && exit 0
    echo "slurm: scontrol requeue failed; resubmit the same command with RUN_DIR=$RUN_DIR to continue" >&2
    exit 1
  fi
  exit "$status"
}

run_is_complete() {
  "$PYTHON" - "$RUN_DIR/summary.json" <<'EOF'
import json, sys
from pathlib import Path
summary = Path(sys.argv[1])
sys.exit(0 if summary.is_file() and not json.loads(summary.read_text()).get("preempted") else 1)
EOF
}
