"""slurm/*.sbatch under a real Slurm: a one-node cluster on this machine (slurm/local_cluster.sh).

Two CPU ranks (gloo) per job. Both scripts run through (multinode.sbatch on the one
node: the c10d path); another single-node job gets the preemption warning in the
middle (USR1 to the batch shell, as `--signal=B:USR1@90` sends it), checkpoints,
requeues itself, resumes in the same run directory and ends with the uninterrupted
job's final loss. Last, a sweep whose jobs the submitit launcher submits. CI installs
slurm-wlm and munge (.ci/run); without sbatch these tests are skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = 30  # long enough (a few seconds) for the warning to land mid-run
JOB = ["strategy=ddp", "trainer.device=cpu", "trainer.precision=fp32", f"trainer.max_steps={STEPS}",
       "trainer.log_every=1", "trainer.export_hf=false", "data.max_eval_examples=8", "logger.progress_bar=false"]
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    shutil.which("sbatch") is None, reason="Slurm is not installed: apt-get install slurm-wlm munge (.ci/run does)")]


LOCAL_CLUSTER = str(REPO / "slurm" / "local_cluster.sh")
submitted_jobs: list[str] = []


@pytest.fixture(scope="module")
def cluster():
    """The local cluster, started for these tests and stopped after them unless it was running before."""
    was_running = subprocess.run([LOCAL_CLUSTER, "status"], capture_output=True).returncode == 0
    subprocess.run([LOCAL_CLUSTER, "up"], check=True, timeout=120)
    yield
    if submitted_jobs:  # a failed test may leave its job behind
        subprocess.run(["scancel", *submitted_jobs], capture_output=True)
    if not was_running:
        subprocess.run([LOCAL_CLUSTER, "down"], check=True, timeout=120)


def submit(tmp_path: Path, script: str = "single_node.sbatch") -> tuple[str, Path]:
    run_dir = tmp_path / "run"
    env = {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "GPUS_PER_NODE": "2",
           "SLIPSTREAM_ROOT": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--output={tmp_path / 'slurm.out'}",
                          str(REPO / "slurm" / script), *JOB],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=60)
    submitted_jobs.append(out.stdout.strip().split(";")[0])
    return submitted_jobs[-1], run_dir


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until(condition, what: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_finished(job_id: str, tmp_path: Path) -> dict[str, str]:
    info = wait_until(lambda: (i := job_info(job_id))["JobState"] in FINAL_STATES and i, f"job {job_id} to end")
    log = (tmp_path / "slurm.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    return info


def steps_logged(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def finished_jobs(cluster, tmp_path_factory) -> dict[str, Path]:
    """Both scripts, run through without interruption (side by side: each job holds one of the node's CPUs)."""
    submitted = {script: submit(tmp_path_factory.mktemp(script.split(".")[0]), script)
                 for script in ("single_node.sbatch", "multinode.sbatch")}
    for job_id, run_dir in submitted.values():
        wait_finished(job_id, run_dir.parent)
    return {script: run_dir for script, (_, run_dir) in submitted.items()}


@pytest.fixture(scope="module")
def uninterrupted(finished_jobs) -> Path:
    return finished_jobs["single_node.sbatch"]


def test_single_node_sbatch_runs_two_ranks_to_a_committed_checkpoint(uninterrupted):
    done = summary(uninterrupted)
    assert done["steps"] == STEPS and not done.get("preempted")
    assert steps_logged(uninterrupted) == list(range(1, STEPS + 1))
    assert (Path(done["checkpoint"]) / "COMMITTED").is_file()
    assert Path(done["checkpoint"]).parent == uninterrupted / "checkpoints"
    assert "world size       2" in (uninterrupted.parent / "slurm.out").read_text()


def test_multinode_sbatch_meets_through_c10d_and_matches(finished_jobs, uninterrupted):
    """One node of the local cluster: the c10d rendezvous on the allocation's first host, as on N nodes."""
    run_dir = finished_jobs["multinode.sbatch"]
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))
    assert summary(run_dir)["final_loss"] == pytest.approx(summary(uninterrupted)["final_loss"], rel=1e-6)
    assert "world size       2" in (run_dir.parent / "slurm.out").read_text()


def test_one_slurm_task_per_rank_without_torchrun(uninterrupted, tmp_path):
    """`srun -n 2 python -m launcher.train`: ranks and rendezvous from Slurm's variables (launcher/topology.py)."""
    run_dir = tmp_path / "run"
    result = subprocess.run(["srun", "--ntasks=2", sys.executable, "-m", "launcher.train", *JOB,
                             f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size       2" in result.stdout
    assert summary(run_dir)["final_loss"] == pytest.approx(summary(uninterrupted)["final_loss"], rel=1e-6)


def test_preempted_job_checkpoints_requeues_and_resumes(uninterrupted, tmp_path):
    job_id, run_dir = submit(tmp_path)
    wait_until(lambda: len(steps_logged(run_dir)) >= 2, "the job to train two steps")
    # What `--signal=B:USR1@90` does before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    # The requeued job is pending, not finished, in between; local_cluster.sh shortens
    # Slurm's 2-minute hold of requeued jobs.
    assert wait_finished(job_id, tmp_path)["Restarts"] == "1"

    log = (tmp_path / "slurm.out").read_text()
    assert "requeueing job" in log and "resumed from" in log
    steps = steps_logged(run_dir)
    # Every step logged once: the second start resumed exactly where the preemption checkpoint was taken.
    assert steps == list(range(1, STEPS + 1)) and "step-00000030" in summary(run_dir)["checkpoint"]
    assert summary(run_dir)["steps_this_run"] < STEPS
    assert summary(run_dir)["final_loss"] == pytest.approx(summary(uninterrupted)["final_loss"], rel=1e-6)


def test_sweep_jobs_run_as_slurm_jobs_through_submitit(cluster, tmp_path):
    """`launch -m hydra/launcher=slurm`: each sweep job a Slurm job running `launch`, then the sweep table."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'slipstream[slurm]'")
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "cluster.nproc_per_node=2",
         *[o for o in JOB if not o.startswith("trainer.max_steps=")], "trainer.max_steps=3",
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert summary(sweep_dir / "0")["steps"] == 3 and list((sweep_dir / ".submitit").iterdir())
    assert "sweep: 1 job;" in result.stdout
