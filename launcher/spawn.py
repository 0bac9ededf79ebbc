"""`launch` starts torchrun on the resolved config and waits for it: one node, or this node of several.

The launcher composed and validated the config once and wrote it to the run
directory; every worker reads that file (`python -m launcher.train --resolved ...`),
so no rank composes Hydra defaults again or picks its own run directory. On several
nodes, `launch` runs on each with the same overrides and an explicit, shared
`hydra.run.dir`; the agents meet through the c10d rendezvous at cluster.rdzv_endpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from launcher.config import ClusterConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
# torchrun passes only SIGTERM, SIGINT, SIGHUP and SIGQUIT on by default; Slurm's
# preemption warning is SIGUSR1 (FIELD_NOTES), which workers turn into a checkpoint.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def needs_torchrun(cluster: ClusterConfig) -> bool:
    """One process without restarts runs in-process; anything else needs torchrun's agent."""
    return cluster.nproc_per_node * cluster.nnodes > 1 or cluster.max_restarts > 0


def rendezvous_args(cluster: ClusterConfig) -> list[str]:
    if cluster.nnodes == 1 and not cluster.rdzv_endpoint:
        # A rendezvous on localhost with a free port: nothing hard-coded, nothing to clash.
        return ["--standalone"]
    return [f"--nnodes={cluster.nnodes}", f"--rdzv_backend={cluster.rdzv_backend}",
            f"--rdzv_endpoint={cluster.rdzv_endpoint}", f"--rdzv_id={cluster.rdzv_id}",
            f"--node_rank={cluster.node_rank}"]


def torchrun_command(resolved: Path, cluster: ClusterConfig) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous_args(cluster),
            f"--nproc_per_node={cluster.nproc_per_node}", f"--max_restarts={cluster.max_restarts}",
            f"--signals_to_handle={FORWARDED_SIGNALS}", "-m", "launcher.train", "--resolved", str(resolved)]


def default_allocator_config(env) -> None:
    """Expandable segments for torch's CUDA allocator, unless the user configured it (env: os.environ or a copy).

    Long sequences and activation offload allocate tensors of many sizes, and without
    expandable segments freed blocks are stranded between them: 8B QLoRA at 303k tokens
    ran out of memory with 57.9 GiB allocated and 12.3 GiB reserved but unusable
    (benchmarks/results/2026-12-07-h100-longest_context-v2.json). Read at CUDA's first
    use, so set before it; Unsloth and torchtitan set the same.
    """
    if "PYTORCH_ALLOC_CONF" not in env and "PYTORCH_CUDA_ALLOC_CONF" not in env:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # the name torch >= 2.6 reads


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # Workers import this checkout even when it is not installed (python -m launcher from a clone).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # Restarts on gloo fail often without it (pytorch #135712, FIELD_NOTES).
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return env


def run_torchrun(resolved: Path, cluster: ClusterConfig) -> int:
    """Runs torchrun to completion; returns its exit code. SIGTERM/SIGHUP/SIGUSR1 are passed on to it."""
    process = subprocess.Popen(torchrun_command(resolved, cluster), env=worker_env())

    def forward(signum, _frame):
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group): let it wind down
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
