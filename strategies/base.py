"""The one protocol every strategy implements; the train loop sees nothing else.

A step is: for each micro-batch, `accumulate(is_last)` around forward + `backward`;
then `step`. Gradient sync happens only inside the last micro-batch's context.
`backward` receives the loss *sum* and the target-token count of the whole optimizer
step over all ranks, so that the gradient is d(sum of token losses) / (global count)
however the step is split into micro-batches and ranks.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from launcher.config import Config, OptimConfig


def build_adamw(params: list[nn.Parameter], named: list[tuple[str, nn.Parameter]], cfg: OptimConfig,
                lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms, biases), fused on CUDA."""
    decay = [p for name, p in named if p.requires_grad and p.ndim >= 2]
    no_decay = [p for name, p in named if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=device.type == "cuda")


class Strategy:
    """Single-process defaults; distributed strategies override what differs."""

    rank: int = 0
    world_size: int = 1

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def setup(self, model: nn.Module, lr: float) -> nn.Module:
        """Move/wrap the model core and build its optimizer; returns the module to call."""
        self.model = model.to(self.device)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = build_adamw([p for _, p in named], named, self.cfg.optim, lr, self.device)
        return self.model

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        yield

    def backward(self, loss_sum: torch.Tensor, global_target_tokens: torch.Tensor) -> None:
        (loss_sum / global_target_tokens.clamp(min=1)).backward()

    def step(self, grad_clip: float) -> torch.Tensor:
        """Clip, step, zero; returns the total gradient norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def unwrapped(self) -> nn.Module:
        """The bare model core, for evaluation and export."""
        return self.model

    def barrier(self) -> None:
        pass

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def build_strategy(cfg: Config, device: torch.device) -> Strategy:
    if cfg.strategy.name == "single":
        from strategies.single import SingleDevice

        return SingleDevice(cfg, device)
    raise ValueError(f"strategy={cfg.strategy.name}: unknown strategy")
