"""The one protocol every strategy implements; the train loop sees nothing else.

A step is: for each micro-batch, `accumulate(is_last)` around forward + `backward`;
then `step`. Gradient sync happens only inside the last micro-batch's context.
`backward` receives the loss *sum* and the target-token count of the whole optimizer
step over all ranks, so that the gradient is d(sum of token losses) / (global count)
however the step is split into micro-batches and ranks. Data-parallel wrappers
(DDP, FSDP, DeepSpeed) average gradients over ranks, so they multiply by the world
size to keep that definition.

Collective calls (every rank calls them, in the same order): `setup`, `step`,
`all_reduce_sum`, `barrier`, `save_checkpoint`, `load_checkpoint`, `export_module`,
and forward passes of the module that `setup`/`unwrapped` return.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from kernels.models.lora import quant_states
from launcher.config import Config
from launcher.guards import step_if_finite
from launcher.precision import Precision
from strategies import checkpoint
from strategies.optimizers import build_optimizer


class Strategy:
    """Single-process defaults; distributed strategies override what differs.

    After `setup`: `model` is what the loop calls (possibly a wrapper: DDP, FSDP, a
    DeepSpeed engine) and `optimizer` the torch optimizer whose param_groups carry the
    learning rate (the LR scheduler's target); only `step` steps it.
    """

    rank: int = 0
    world_size: int = 1

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # fp16 compute: gradients of a scaled loss, unscaled before clipping, overflowed steps skipped
        self.scales_loss = Precision.resolve(cfg.trainer.precision, device).scales_loss
        self.scaler = self.grad_scaler() if self.scales_loss else None

    def grad_scaler(self):
        return torch.amp.GradScaler(self.device.type)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def setup(self, model: nn.Module, lr: float) -> nn.Module:
        """Move/wrap the model core and build its optimizer; returns the module to call."""
        self.model = model.to(self.device)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(named, self.cfg.optim, lr, self.device)
        return self.model

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        yield

    def backward(self, loss_sum: torch.Tensor, global_target_tokens: torch.Tensor) -> None:
        self._backward(loss_sum / global_target_tokens.clamp(min=1))

    def step(self, grad_clip: float, loss: torch.Tensor | None = None) -> torch.Tensor:
        """Clip, step, zero; returns the total gradient norm before clipping.

        With `loss` (the step's loss, the same on every rank) a NaN/inf loss or gradient
        norm skips the update on every rank alike (launcher/guards.py); under fp16 the
        scaler skips overflowed steps and lowers its scale.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        self._unscale()
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self._optimizer_step(loss, grad_norm)
        return grad_norm

    def _unscale(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)

    def _optimizer_step(self, loss: torch.Tensor | None, grad_norm: torch.Tensor) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when the unscaled gradients hold an inf/NaN
            self.scaler.update()
        elif loss is None:
            self.optimizer.step()
        else:
            step_if_finite(self.optimizer, loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def unwrapped(self) -> nn.Module:
        """The model core for evaluation: forward and `logits` work on it (on every rank together)."""
        return self.model

    def export_module(self) -> nn.Module | None:
        """A plain model core with full, unsharded weights on the main rank (None elsewhere), for export."""
        return self.unwrapped() if self.is_main else None

    def parameter_counts(self) -> tuple[int, int]:
        """(all parameters, trainable parameters) of the whole model, however it is sharded or quantised."""
        model = self.unwrapped()
        # a 4-bit weight (QLoRA) packs two values per byte; its quant_state knows the real shape
        real_numel = {name: state.shape.numel() for name, state in quant_states(model).items()}
        params = [(real_numel.get(name, p.numel()), p.requires_grad) for name, p in model.named_parameters()]
        return sum(n for n, _ in params), sum(n for n, trainable in params if trainable)

    def save_checkpoint(self, root, step: int, scheduler, trainer_state: dict, keep_last: int):
        """Write checkpoint `step` under `root` atomically; returns its committed path, or with
        trainer.async_checkpoint a PendingCheckpoint (shards still being written) to `result()` later."""
        in_background = self.cfg.trainer.async_checkpoint
        return checkpoint.save(root, step, self.model, self.optimizer, scheduler, trainer_state, self, keep_last,
                               in_background, self.background_group() if in_background else None)

    def background_group(self):
        """The process group a background checkpoint writer talks over (None: one process)."""
        return None

    def load_checkpoint(self, path, scheduler) -> dict:
        """Restore model, optimizer, scheduler and RNG from `path`; returns the trainer state."""
        return checkpoint.load(path, self.model, self.optimizer, scheduler, self.rank)

    def barrier(self) -> None:
        pass

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def build_strategy(cfg: Config, device: torch.device) -> Strategy:
    """The strategy named by `strategy.name`; distributed ones join the process group here."""
    name = cfg.strategy.name
    if name == "single":
        from strategies.single import SingleDevice

        return SingleDevice(cfg, device)
    if name == "ddp":
        from strategies.ddp import DDPStrategy

        return DDPStrategy(cfg, device)
    if name in ("fsdp", "hsdp"):
        from strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, device)
    if name.startswith("zero"):
        from strategies.zero import ZeROStrategy

        return ZeROStrategy(cfg, device)
    raise ValueError(f"strategy={name}: unknown strategy")
