"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced once per step.

Non-final micro-batches run inside `no_sync()`, so their gradients only accumulate
locally; the last micro-batch's backward all-reduces the sum. DDP averages over ranks,
so `backward` multiplies by the world size to keep the gradient at
d(sum of token losses over all ranks) / (global target tokens).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from strategies.distributed import DataParallelStrategy
from strategies.optimizers import build_optimizer


class DDPStrategy(DataParallelStrategy):
    def setup(self, model: nn.Module, lr: float) -> nn.Module:
        core = model.to(self.device)
        self.ddp = DistributedDataParallel(core, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = self.ddp
        named = [(n, p) for n, p in core.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(named, self.cfg.optim, lr, self.device)
        return self.ddp

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if is_last else self.ddp.no_sync():
            yield

    def backward(self, loss_sum: torch.Tensor, global_target_tokens: torch.Tensor) -> None:
        self._backward(loss_sum * (self.world_size / global_target_tokens.clamp(min=1)))

    def unwrapped(self) -> nn.Module:
        return self.ddp.module
