"""The non-finite step guard: a NaN/inf loss or gradient norm skips the update; too many in a row stop the run.

The decision must be the same on every rank, or the ranks' weights drift apart. Both
inputs are global: the loss is all-reduced before the optimizer step and the strategy's
gradient norm is the norm of the whole (reduced) gradient. Single, DDP and FSDP skip
the optimizer step themselves (`Strategy.step(grad_clip, loss)`); DeepSpeed's engine
steps on its own (deepspeed 0.19): ZeRO-1/2 skip a step with a non-finite gradient
norm (their overflow check, on in fp32 and, through bf16.check_grad_overflow, in bf16),
ZeRO-3 checks only in fp16, so in fp32/bf16 it applies the step and the weights become
NaN. The guard counts the step either way, the loop saves no checkpoint while the
last step was non-finite, and after `trainer.max_nonfinite_steps` in a row the run
stops: the last good checkpoint is what there is to resume from.

Checking costs one host sync per optimizer step (a bool after the gradient norm).
"""
from __future__ import annotations

import torch


def finite_step(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """True when both the step's global loss and its gradient norm are finite (one host sync)."""
    return bool(torch.isfinite(loss.float()) & torch.isfinite(grad_norm.float().to(loss.device)))


class NonFiniteSteps(ValueError):
    """Too many non-finite steps in a row: a user-facing stop, reported in one line like config errors."""


class NonFiniteGuard:
    """Counts non-finite steps; `must_stop` after max_in_a_row of them in a row."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.skipped = 0  # over this run
        self.in_a_row = 0
        self._last = (0.0, 0.0)

    @property
    def last_step_finite(self) -> bool:
        return self.in_a_row == 0

    @property
    def must_stop(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        if finite_step(loss, grad_norm):
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        self._last = (float(loss), float(grad_norm))

    def error(self, step: int, last_checkpoint) -> NonFiniteSteps:
        resume = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "there is no checkpoint"
        return NonFiniteSteps(
            f"trainer.max_nonfinite_steps={self.max_in_a_row}: steps {step - self.in_a_row + 1}..{step} in a row "
            f"had a NaN/inf loss or gradient norm (loss {self._last[0]:.4g}, grad norm {self._last[1]:.4g}) and "
            f"were skipped; stopped without saving, {resume}. Lower optim.lr, raise optim.warmup_steps, set "
            f"trainer.grad_clip, check the data, or use trainer.precision=bf16_autocast instead of bf16")
