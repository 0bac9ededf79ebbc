"""Effective batch: gradient accumulation derived from global batch, micro batch and world size."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch_size: int
    accumulation_steps: int
    global_batch_size: int

    @classmethod
    def resolve(cls, global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchPlan:
        per_step = micro_batch_size * world_size
        if global_batch_size % per_step:
            lower = global_batch_size // per_step * per_step
            valid_globals = [g for g in (lower, lower + per_step) if g > 0]
            valid_micros = [m for m in range(1, global_batch_size // world_size + 1)
                            if global_batch_size % (m * world_size) == 0]
            raise ValueError(
                f"trainer.global_batch_size={global_batch_size} is not divisible by micro_batch_size x world_size "
                f"= {micro_batch_size} x {world_size}; nearest valid global_batch_size: "
                f"{' or '.join(map(str, valid_globals))}; or micro_batch_size in {valid_micros or 'none'}")
        return cls(world_size, micro_batch_size, global_batch_size // per_step, global_batch_size)


def scaled_lr(lr: float, rule: str, global_batch_size: int, reference_batch_size: int) -> float:
    """The learning rate after the (explicit, never implicit) batch-size scaling rule."""
    if rule == "none":
        return lr
    ratio = global_batch_size / reference_batch_size
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))
