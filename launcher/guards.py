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

No host sync of its own: torch's fused Adam/AdamW skip the update on the device when
handed a `found_inf` flag (the mechanism GradScaler uses), and the counters stay on the
device until the loop reads them at its logged steps (its one host sync), which is
also where a run that must stop stops. Other optimizers (bitsandbytes, unfused,
FSDP2's DTensor parameters) cost one host sync per step to decide.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """A device bool: the step's global loss and its gradient norm are both finite."""
    return torch.isfinite(loss.float()) & torch.isfinite(grad_norm.float().to(loss.device))


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """torch's fused Adam/AdamW over plain tensors: they take `found_inf` and skip on the device."""
    return (getattr(optimizer, "_step_supports_amp_scaling", False) and bool(optimizer.defaults.get("fused"))
            and not any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]))


def step_if_finite(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """optimizer.step() unless the loss or the gradient norm is NaN/inf."""
    ok = finite(loss, grad_norm)
    if _skips_on_device(optimizer):
        optimizer.found_inf = (~ok).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(ok):
        optimizer.step()


class NonFiniteSteps(ValueError):
    """Too many non-finite steps in a row: a user-facing stop, reported in one line like config errors."""


class NonFiniteGuard:
    """Counts non-finite steps on the device; the properties read them (a host sync: call at logged steps)."""

    def __init__(self, max_in_a_row: int, scales_loss: bool = False):
        self.max_in_a_row = max_in_a_row
        # fp16: an overflowed gradient is the loss scaler's business (it skips and lowers the scale);
        # counted apart, never a strike. A non-finite loss still is one.
        self.scales_loss = scales_loss
        self._skipped = self._in_a_row = self._overflows = 0  # tensors after the first update

    @property
    def skipped(self) -> int:
        """Non-finite steps over this run."""
        return int(self._skipped)

    @property
    def overflows(self) -> int:
        """fp16 steps the loss scaler skipped because the gradients overflowed."""
        return int(self._overflows)

    @property
    def in_a_row(self) -> int:
        return int(self._in_a_row)

    @property
    def last_step_finite(self) -> bool:
        return self.in_a_row == 0

    @property
    def must_stop(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        if self.scales_loss:
            loss_ok = torch.isfinite(loss.float())
            self._overflows = self._overflows + (loss_ok & ~finite(loss, grad_norm)).long()
            bad = (~loss_ok).long()
        else:
            bad = (~finite(loss, grad_norm)).long()
        self._skipped = self._skipped + bad
        self._in_a_row = (self._in_a_row + 1) * bad

    def error(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, last_checkpoint) -> NonFiniteSteps:
        """The stop, raised at `step`, which `must_stop` says was the last of the bad run (its loss and norm)."""
        resume = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "there is no checkpoint"
        return NonFiniteSteps(
            f"trainer.max_nonfinite_steps={self.max_in_a_row}: steps {step - self.in_a_row + 1}..{step} in a row "
            f"had a NaN/inf loss or gradient norm (loss {float(loss):.4g}, grad norm {float(grad_norm):.4g}) and "
            f"were skipped; stopped without saving, {resume}. Lower optim.lr, raise optim.warmup_steps, set "
            f"trainer.grad_clip, check the data, or use trainer.precision=bf16_autocast instead of bf16")
