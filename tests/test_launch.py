"""Launching beyond one process: topology from torchrun/Slurm, the torchrun command, sweeps, multi-node, restarts.

The end-to-end tests run the tiny default job (fp32, CPU, gloo) for STEPS steps with
a global batch of 64 and compare per-step losses against one process: a sweep over
1 and 2 processes, two `launch` agents meeting through c10d on localhost as two
"nodes", and a 2-rank group that loses a worker mid-run and is restarted by torchrun
(tests/fault_injection/ makes the worker crash). Last, a preemption signal sent to
`launch` reaches torchrun's workers.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config import ClusterConfig
from launcher.spawn import default_allocator_config, needs_torchrun, torchrun_command
from launcher.topology import Topology, _first_host_parsed, slurm_torch_env, tasks_on_node
from test_strategies import signal_after_rows

REPO = Path(__file__).resolve().parent.parent
STEPS = 6
SAVE_EVERY = 2
# fp32 on CPU: the 2-rank runs differ from one process only in the order of float sums.
LOSS_RTOL = 1e-5
JOB = ["strategy=ddp", "trainer.device=cpu", "trainer.precision=fp32", f"trainer.max_steps={STEPS}",
       f"trainer.save_every={SAVE_EVERY}", "trainer.export_hf=false", "data.max_eval_examples=8",
       "logger.progress_bar=false"]


def env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cwd: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=env(**extra_env),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the last time the step was logged (a restarted run logs some steps twice)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ----------------------------------------------------------------------------- topology from the environment

def test_topology_reads_torchrun_variables():
    environ = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    assert Topology.from_env(environ) == Topology(rank=5, local_rank=1, world_size=8)  # torchrun wins over srun


def test_topology_maps_one_slurm_task_per_gpu():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
               "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[007-008]",
               "SLURM_TASKS_PER_NODE": "4(x2)"}
    assert Topology.from_env(environ) == Topology(rank=5, local_rank=1, world_size=8)
    # exported for torch.distributed's env:// init and the config checks
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"], environ["LOCAL_WORLD_SIZE"]) == \
        ("5", "8", "1", "4")
    assert environ["MASTER_ADDR"] == "gpu007"
    assert environ["MASTER_PORT"] == str(15000 + 123456 % 15000)


def test_slurm_mapping_keeps_what_the_user_set():
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7",
               "SLURM_JOB_NODELIST": "n1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"}
    derived = slurm_torch_env(environ)
    assert "MASTER_ADDR" not in derived and "MASTER_PORT" not in derived


def test_slurm_batch_shell_is_not_a_task():
    """The batch script has SLURM_PROCID too, but no step: a `python -m launcher` there is one process."""
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert Topology.from_env(environ) == Topology(rank=0, local_rank=0, world_size=1)
    assert "RANK" not in environ


@pytest.mark.parametrize("nodelist,first", [("gpu[007-009,012],cpu1", "gpu007"), ("n1,n2", "n1"),
                                            ("node[3]-ib", "node3-ib"), ("localhost", "localhost")])
def test_first_host_of_a_node_list(nodelist, first):
    assert _first_host_parsed(nodelist) == first


def test_tasks_on_node_expands_repeats():
    assert [tasks_on_node("2(x3),1", node) for node in range(4)] == [2, 2, 2, 1]


# ----------------------------------------------------------------------------- the torchrun command

def test_torchrun_command_one_node_and_several():
    one = torchrun_command(Path("run/config.yaml"), ClusterConfig(nproc_per_node=4))
    assert "--standalone" in one and "--nproc_per_node=4" in one and "--max_restarts=0" in one
    assert one[-4:] == ["-m", "launcher.train", "--resolved", "run/config.yaml"]
    several = torchrun_command(Path("c.yaml"), ClusterConfig(nproc_per_node=8, nnodes=4, rdzv_endpoint="n1:29400",
                                                             rdzv_id="job7", max_restarts=2))
    assert "--standalone" not in several
    for arg in ("--nnodes=4", "--rdzv_backend=c10d", "--rdzv_endpoint=n1:29400", "--rdzv_id=job7",
                "--max_restarts=2", "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"):
        assert arg in several
    assert not needs_torchrun(ClusterConfig()) and needs_torchrun(ClusterConfig(max_restarts=1))


@pytest.mark.parametrize("users", [{}, {"PYTORCH_ALLOC_CONF": "backend:native"},
                                   {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}])
def test_workers_get_expandable_segments_unless_the_user_configured_the_allocator(users):
    env = dict(users)
    default_allocator_config(env)
    assert env == (users or {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})


@pytest.mark.parametrize("overrides,expected", [
    (["cluster.nnodes=2"], "cluster.rdzv_endpoint: required with cluster.nnodes=2"),
    (["cluster.nnodes=2", "cluster.rdzv_endpoint=node1"], "cluster.rdzv_endpoint: got 'node1'; use host:port"),
    (["cluster.rdzv_backend=etcd"], "cluster.rdzv_backend: got 'etcd'; choose one of c10d, static"),
    (["cluster.max_restarts=-1"], "cluster.max_restarts: must be >= 0"),
    (["cluster.node_rank=1"], "cluster.node_rank: got 1; must be in [0, cluster.nnodes=1)"),
])
def test_bad_cluster_config_fails_in_one_line(overrides, expected):
    from launcher.compose import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(["strategy=ddp", *overrides], multirun=False)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_shipped_hydra_launcher_and_cluster_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'slipstream[slurm]'")
    from launcher.compose import compose_config, to_config

    cfg = compose_config(["hydra/launcher=slurm", "cluster=slurm"], with_hydra=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg.hydra.launcher.tasks_per_node == 1  # one `launch` per job, which starts torchrun itself
    assert to_config(cfg).cluster.name == "slurm"


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`launch -m` over 1 and 2 processes: job 0 is also the one-process reference of the tests below."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    result = launch(sweep_dir, "-m", "cluster.nproc_per_node=1,2", "optim.lr=3e-3", *JOB,
                    f"hydra.sweep.dir={sweep_dir}")
    return sweep_dir, result


def test_sweep_jobs_have_own_run_dirs_same_batch_and_a_summary_table(sweep):
    sweep_dir, result = sweep
    one, two = sweep_dir / "0", sweep_dir / "1"
    assert summary(one)["steps"] == summary(two)["steps"] == STEPS
    assert list(losses(two).values()) == pytest.approx(list(losses(one).values()), rel=LOSS_RTOL)
    rows = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [(row["world_size"], row["global_batch_size"]) for row in rows] == [(1, 64), (2, 64)]
    assert rows[1]["final_loss"] == summary(two)["final_loss"] and rows[1]["tokens_per_s"] > 0
    table = result.stdout[result.stdout.index("sweep: 2 jobs"):].splitlines()
    assert table[1].split()[:4] == ["job", "overrides", "world", "global"]
    assert table[2].startswith("cluster.nproc_per_node=1 ") and table[3].startswith("cluster.nproc_per_node=2 ")
    # the start table shows how each job's effective batch is made
    for row in ("world size       2", "micro batch      32", "accumulation     1", "global batch     64",
                "tokens per step", "lr               0.003"):
        assert row in result.stdout


def test_two_nodes_meet_through_c10d_and_follow_one_process(sweep, tmp_path):
    """Two `launch` agents, one process each, as on two nodes sharing a filesystem."""
    run_dir = tmp_path / "run"
    node = [sys.executable, "-m", "launcher", *JOB, "cluster.nnodes=2", "cluster.nproc_per_node=1",
            f"cluster.rdzv_endpoint=127.0.0.1:{free_port()}", f"cluster.rdzv_id=test-{os.getpid()}",
            f"hydra.run.dir={run_dir}"]
    agents = [subprocess.Popen(node, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(out[-4000:] for out in outputs)
    assert sum("world size       2" in out for out in outputs) == 1  # rank 0's start table, on one node
    reference = losses(sweep[0] / "0")
    assert list(losses(run_dir).values()) == pytest.approx(list(reference.values()), rel=LOSS_RTOL)


def test_torchrun_restarts_a_crashed_group_which_resumes(sweep, tmp_path):
    """Rank 1 dies at step 4 (after the checkpoint at step 2); torchrun restarts both ranks once."""
    run_dir = tmp_path / "run"
    result = launch(tmp_path, *JOB, "cluster.nproc_per_node=2", "cluster.max_restarts=1", f"hydra.run.dir={run_dir}",
                    PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "fault_injection"), str(REPO)]),
                    SLIPSTREAM_TEST_CRASH="1:4")
    assert "(exitcode: 17) local_rank: 1" in result.stderr, result.stderr[-3000:]  # the injected crash
    assert "resumed from" in result.stderr and "step-00000002 at step 2" in result.stderr
    done = summary(run_dir)
    assert done["steps"] == STEPS and done["steps_this_run"] == STEPS - SAVE_EVERY  # resumed from step 2
    reference = losses(sweep[0] / "0")
    assert list(losses(run_dir).values()) == pytest.approx(list(reference.values()), rel=LOSS_RTOL)
    assert done["final_loss"] == pytest.approx(summary(sweep[0] / "0")["final_loss"], rel=LOSS_RTOL)


def test_launch_passes_the_preemption_signal_to_torchruns_workers(tmp_path):
    """SIGUSR1 to `launch` -> torchrun -> every worker: a checkpoint at the next step, exit code 0."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "launcher", *JOB, "trainer.max_steps=500", "trainer.log_every=1",
               "cluster.nproc_per_node=2", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = signal_after_rows(process, run_dir, rows=2, timeout=240)
    assert process.returncode == 0, output[-4000:]
    stopped = summary(run_dir)
    assert stopped["preempted"] == "SIGUSR1" and 2 <= stopped["steps"] < 500
    assert (run_dir / "checkpoints" / f"step-{stopped['steps']:08d}" / "COMMITTED").is_file()
