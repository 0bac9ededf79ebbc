"""`trainer.precision`: how parameters are stored, how the forward computes, and whether the loss is scaled.

auto picks bf16 autocast on GPUs with bf16 (Ampere and newer), fp16 autocast with
dynamic loss scaling on older GPUs (T4, V100, RTX 20xx), and fp32 on the CPU. fp16's
five exponent bits overflow where bf16's eight do not, so its gradients are computed
on a scaled loss and unscaled before clipping; a step whose gradients overflowed is
skipped and the scale lowered (torch.amp.GradScaler, or DeepSpeed's own under ZeRO).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    device_type: str

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> Precision:
        if name == "auto":
            if device.type != "cuda":
                name = "fp32"
            else:
                name = "bf16_autocast" if torch.cuda.is_bf16_supported() else "fp16_autocast"
        if name == "bf16":
            return cls(torch.bfloat16, None, device.type)
        if name == "bf16_autocast":
            return cls(torch.float32, torch.bfloat16, device.type)
        if name == "fp16_autocast":
            return cls(torch.float32, torch.float16, device.type)
        return cls(torch.float32, None, device.type)

    @property
    def shard_dtype(self) -> torch.dtype:
        """The dtype sharded parameters are gathered in: bf16 under bf16 and bf16 autocast (FSDP2's
        MixedPrecisionPolicy), else the parameters' own."""
        return torch.bfloat16 if torch.bfloat16 in (self.param_dtype, self.autocast_dtype) else self.param_dtype

    @property
    def scales_loss(self) -> bool:
        """fp16 compute: gradients need dynamic loss scaling."""
        return self.autocast_dtype == torch.float16

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)
