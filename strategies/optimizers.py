"""The `optim=` group: AdamW (fused on CUDA) and bitsandbytes' 8-bit and paged AdamW.

8-bit AdamW keeps both moments in blockwise-quantised uint8 (2 bytes a parameter
instead of 8); paged variants keep the states in CUDA unified memory, which the
driver pages out to host memory under pressure instead of failing with OOM. All of
them step in place on plain tensors: single and ddp take them; FSDP2's DTensor
parameters and DeepSpeed's ZeRO (which partitions and steps its own AdamW) take
`optim=adamw` only (launcher.compose says so before anything starts). Their states
are ordinary optimizer state and go into checkpoints with the rest.
"""
from __future__ import annotations

import torch
from torch import nn

from launcher.config import OptimConfig

BITSANDBYTES_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw_8bit": "PagedAdamW8bit",
}


def adamw_param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not norms, biases); frozen parameters left out."""
    decay = [p for name, p in named if p.requires_grad and p.ndim >= 2]
    no_decay = [p for name, p in named if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig, lr: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `optim.name` over the trainable parameters in `named`."""
    groups = adamw_param_groups(named, cfg.weight_decay)
    hyper = dict(lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **hyper, fused=device.type == "cuda")
    import bitsandbytes as bnb  # launcher.compose.check_machine has checked that it is installed

    return getattr(bnb.optim, BITSANDBYTES_OPTIMIZERS[cfg.name])(groups, **hyper)
