"""Where this process sits: rank, world size and device, from torchrun's environment or Slurm's.

torchrun (also under `srun torchrun`) sets RANK, LOCAL_RANK and WORLD_SIZE. With one
Slurm task per GPU (`srun python -m launcher.train ...`) there is no torchrun: the
ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and the rendezvous of
torch.distributed's env:// init is the job's first node at a port derived from the
job id, so every task of the job agrees without talking first.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import MutableMapping

import torch

# Derived ports stay in [BASE, BASE + SPAN): above the well-known and registered ranges
# most services use, below Linux's default ephemeral range (32768+).
MASTER_PORT_BASE = 15000
MASTER_PORT_SPAN = 15000


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] = os.environ) -> Topology:
        """From torchrun's variables; under a Slurm job step without them, exports them from Slurm's first."""
        if "RANK" not in env and is_slurm_task(env):
            env.update(slurm_torch_env(env))
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    def device(self, choice: str) -> torch.device:
        if choice == "cuda" and not torch.cuda.is_available():
            raise ValueError("trainer.device=cuda: no CUDA device is visible; use trainer.device=cpu or auto")
        if choice == "cpu" or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank)


def is_slurm_task(env: MutableMapping[str, str]) -> bool:
    """A task that srun started: the batch script itself also has SLURM_PROCID, but no step id."""
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


def slurm_torch_env(env: MutableMapping[str, str]) -> dict[str, str]:
    """torch.distributed's env:// variables for one Slurm task per device; set ones are kept."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    derived = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(tasks_on_node(env.get("SLURM_TASKS_PER_NODE", "1"), int(env.get("SLURM_NODEID", 0)))),
        "MASTER_PORT": str(master_port(int(env.get("SLURM_JOB_ID", 0)))),
    }
    if "MASTER_ADDR" not in env:
        derived["MASTER_ADDR"] = first_host(nodelist)
    return {key: value for key, value in derived.items() if key not in env}


def master_port(job_id: int) -> int:
    return MASTER_PORT_BASE + job_id % MASTER_PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `scontrol show hostnames` where Slurm's tools are, else parsed."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return _first_host_parsed(nodelist)


def _first_host_parsed(nodelist: str) -> str:
    """"gpu[007-009,012],cpu1" -> "gpu007": the first name, with the first number of its first range."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist)
    prefix, ranges, suffix = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "") + suffix


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """The node's entry in SLURM_TASKS_PER_NODE, which counts runs of nodes: "2(x3),1" is 2, 2, 2, 1."""
    counts = []
    for part in tasks_per_node.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[min(node_id, len(counts) - 1)]
