"""Where this process sits: rank, world size and device, from torchrun's environment."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls) -> Topology:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    def device(self, choice: str) -> torch.device:
        if choice == "cuda" and not torch.cuda.is_available():
            raise ValueError("trainer.device=cuda: no CUDA device is visible; use trainer.device=cpu or auto")
        if choice == "cpu" or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank)
