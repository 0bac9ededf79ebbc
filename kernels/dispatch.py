"""Which implementation of the fused ops the model core runs: `model.kernels`.

`auto` means Triton on CUDA and the PyTorch reference elsewhere; the choice is
logged once per process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
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
    swiglu_linear: Callable
    linear_cross_entropy: Callable
    lora_projections: Callable


def _ops_of(name: str, module) -> Ops:
    """The module's function of each Ops field's name: kernels.reference and kernels.ops are twins."""
    return Ops(name, **{field.name: getattr(module, field.name) for field in fields(Ops) if field.name != "name"})


REFERENCE_OPS = _ops_of("torch", reference)

_logged: set[str] = set()


def resolve_ops(choice: str, device: torch.device) -> Ops:
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"model.kernels={choice!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    if choice == "auto":
        choice = "triton" if device.type == "cuda" else "torch"
    if choice == "triton":
        from kernels import ops as triton_ops  # imports triton; only when asked for

        ops = _ops_of("triton", triton_ops)
    else:
        ops = REFERENCE_OPS
    if ops.name not in _logged:
        _logged.add(ops.name)
        log.info("kernels: %s ops on %s", ops.name, device.type)
    return ops
