"""FSDP2 (`torch.distributed.fsdp.fully_shard`): full shard, shard-grad-op and hybrid (HSDP).

Each decoder block in `model.model.layers` is one FSDP group, and the root (embeddings,
final norm, LM head) another. Parameters are DTensors sharded on dim 0:

- strategy=fsdp: a 1-D mesh over all ranks; `strategy.reshard_after_forward=false`
  keeps gathered parameters from forward to backward (ZeRO-2 / SHARD_GRAD_OP style:
  less communication, more memory).
- strategy=hsdp: a 2-D mesh (replicate, shard): shard inside a group of
  world / replicate_degree ranks, all-reduce across the replicate_degree groups.

Gradient accumulation without communication: `set_requires_gradient_sync(False)` on
non-final micro-batches (for HSDP it covers the reduce-scatter and the all-reduce).
FSDP averages gradients over all data-parallel ranks, so `backward` multiplies by the
world size. With bf16 precision (and bf16 autocast) the blocks' parameters are gathered
in bf16 and gradients reduced in fp32 (`MixedPrecisionPolicy`); under bf16 autocast
the root's (embeddings, final norm, LM head) are gathered in fp32 and the blocks keep
their inputs' dtype, so the residual stream stays fp32 and the model computes what it
computes in one process, where autocast casts only the matmuls (casting it all to bf16,
as FSDP2 does by default, put 2 x H200 runs 0.28 off the single-GPU loss curve in 20
steps). Frozen and trainable parameters may share a group (FSDP2 shards per parameter);
frozen ones get no gradient and no reduction.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from kernels.models.lora import quant_states
from launcher.precision import Precision
from strategies.distributed import DataParallelStrategy, core_spec, plain_core, refuse_4bit_storage_cast
from strategies.optimizers import build_optimizer

# Methods of the model core that evaluation calls instead of forward; FSDP must gather around them.
# (Not hidden_states: forward calls it, and a nested root hook would reshard mid-forward.)
_EXTRA_FORWARD_METHODS = ("logits",)


class FSDPStrategy(DataParallelStrategy):
    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        options = cfg.strategy
        if options.name == "hsdp":
            # 0: one copy per node, counted from torchrun's environment (the config may not say)
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            replicate = options.replicate_degree or max(1, self.world_size // per_node)
            if replicate < 1 or self.world_size % replicate:
                raise ValueError(f"strategy.replicate_degree={options.replicate_degree}: must divide the world size "
                                 f"{self.world_size} (replicas x shard group size)")
            self.mesh = init_device_mesh(device.type, (replicate, self.world_size // replicate),
                                         mesh_dim_names=("replicate", "shard"))
        else:
            self.mesh = init_device_mesh(device.type, (self.world_size,), mesh_dim_names=("shard",))

    @staticmethod
    def _mixed_precision(precision: Precision, root: bool) -> MixedPrecisionPolicy:
        if precision.shard_dtype != torch.bfloat16:
            return MixedPrecisionPolicy()
        if root:  # embeddings, final norm, LM head: in their own dtype, as autocast leaves them
            return MixedPrecisionPolicy(reduce_dtype=torch.float32)
        # A block's inputs keep their dtype: under bf16 autocast the residual stream stays fp32, as in one process.
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)

    def setup(self, model: nn.Module, lr: float) -> nn.Module:
        precision = Precision.resolve(self.cfg.trainer.precision, self.device)
        # FSDP2 gathers every parameter in shard_dtype, bytes included
        refuse_4bit_storage_cast(model, precision.shard_dtype, "FSDP2 gathers parameters in", bytes_survive=False)
        model = model.to(self.device)
        self._core = core_spec(model)
        shard = dict(mesh=self.mesh, reshard_after_forward=self.cfg.strategy.reshard_after_forward)
        for block in model.model.layers:
            fully_shard(block, **shard, mp_policy=self._mixed_precision(precision, root=False))
        fully_shard(model, **shard, mp_policy=self._mixed_precision(precision, root=True))
        for method in _EXTRA_FORWARD_METHODS:
            register_fsdp_forward_method(model, method)
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(named, self.cfg.optim, lr, self.device)
        return model

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(is_last)
        yield

    def backward(self, loss_sum: torch.Tensor, global_target_tokens: torch.Tensor) -> None:
        self._backward(loss_sum * (self.world_size / global_target_tokens.clamp(min=1)))

    def step(self, grad_clip: float, loss: torch.Tensor | None = None) -> torch.Tensor:
        """Clip on the sharded (DTensor) gradients: the norm is reduced over the mesh first; skip if non-finite."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        self._unscale()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
        self._optimizer_step(loss, grad_norm)
        return grad_norm

    def grad_scaler(self):
        """Its found-inf flags are all-reduced over the mesh, so every rank skips an overflowed step alike."""
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(self.device.type)

    def export_module(self) -> nn.Module | None:
        """Gathers the full state dict onto rank 0 (CPU) and loads it into a plain, unsharded core."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return plain_core(self._core, state, quant_states(self.model)) if self.is_main else None
