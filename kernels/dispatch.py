"""Which implementation of the fused ops the model core runs: `model.kernels`.

`auto` means Triton on CUDA and the PyTorch reference elsewhere; the choice is
logged once per process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import reference

log = logging.getLogger(__name__)

KERNEL_CHOICES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    apply_rope: Callable
    swiglu: Callable
    linear_cross_entropy: Callable
    lora_projections: Callable


REFERENCE_OPS = Ops(
    name="torch",
    rms_norm=reference.rms_norm,
    add_rms_norm=reference.add_rms_norm,
    apply_rope=reference.apply_rope,
    swiglu=reference.swiglu,
    linear_cross_entropy=reference.linear_cross_entropy,
    lora_projections=reference.lora_projections,
)

_logged: set[str] = set()


def _triton_ops() -> Ops:
    from kernels import ops  # imports triton; only when asked for

    return Ops(
        name="triton",
        rms_norm=ops.rms_norm,
        add_rms_norm=ops.add_rms_norm,
        apply_rope=ops.apply_rope,
        swiglu=ops.swiglu,
        linear_cross_entropy=ops.linear_cross_entropy,
        lora_projections=ops.lora_projections,
    )


def resolve_ops(choice: str, device: torch.device) -> Ops:
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"model.kernels={choice!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    if choice == "auto":
        choice = "triton" if device.type == "cuda" else "torch"
    ops = _triton_ops() if choice == "triton" else REFERENCE_OPS
    if ops.name not in _logged:
        _logged.add(ops.name)
        log.info("kernels: %s ops on %s", ops.name, device.type)
    return ops
