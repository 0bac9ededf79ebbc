"""DeepSpeed ZeRO stages 1, 2, 3 and ZeRO-3 with CPU offload, behind the one protocol.

The DeepSpeed JSON config is generated from the Hydra config (batch sizes from the
effective-batch plan, precision, clipping, AdamW), then `strategy.deepspeed_config`
(a user JSON file) is merged over it; a user value that contradicts the batch plan or
the strategy is a ValueError naming the key, raised before training starts.

Loss scaling. DeepSpeed's engine divides the loss by gradient_accumulation_steps in
`engine.backward` and its ZeRO optimizers average gradients over the data-parallel
ranks. Here the loss of a micro-batch is its token-loss *sum* divided by the target
tokens of the whole step (all micro-batches, all ranks), so:
- `engine.backward(loss, scale_wrt_gas=False)` skips the division by the
  accumulation steps (deepspeed/runtime/engine.py, `backward`:
  `loss = loss / self.gradient_accumulation_steps() if scale_wrt_gas else loss`);
- the loss is multiplied by the world size to undo the rank average
  (stage 1/2 `gradient_reduction_w_predivide` / `average_tensor`, stage 3
  `__avg_scatter_contiguous_grads`: `div_(world size)` around the all-reduce).

Accumulation boundary. The loop calls `step()` once per optimizer step, not once per
micro-batch as DeepSpeed's examples do, so the engine's micro-step counter would be
wrong. `accumulate(is_last)` instead sets the boundary explicitly with
`engine.set_gradient_accumulation_boundary(is_last)` before each backward: stage 1
reduces gradients only in the last backward, stage 2/3 reduce-scatter every backward
(that is what partitioned gradients mean) and `engine.step()` applies the update
because the boundary is set (engine.py `step`: `if self.is_gradient_accumulation_boundary():
self._take_model_step(...)`).

Precision. trainer.precision=bf16 or bf16_autocast turns on DeepSpeed's bf16 mode:
bf16 parameters in the module, fp32 master weights and optimizer states in the ZeRO
optimizer. For bf16_autocast that matches the other strategies (fp32 weights, bf16
compute); for pure bf16 it does not: single/DDP/FSDP step the bf16 parameters
themselves, so ZeRO's losses come out lower and its memory higher.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from kernels.models.lora import quant_states
from launcher.batching import BatchPlan
from launcher.config import Config
from launcher.precision import Precision
from strategies import checkpoint
from strategies.optimizers import adamw_param_groups
from strategies.distributed import DataParallelStrategy, core_spec, plain_core, refuse_4bit_storage_cast

log = logging.getLogger(__name__)

_DS_TAG = checkpoint.DEEPSPEED_DIR  # the engine's checkpoint lives in step-N/deepspeed/


def half_dtype(cfg: Config, device_type: str) -> torch.dtype | None:
    """bf16 or fp16 when the run computes in it (DeepSpeed's bf16 / fp16 modes), else None."""
    precision = Precision.resolve(cfg.trainer.precision, torch.device(device_type))
    return torch.bfloat16 if torch.bfloat16 in (precision.param_dtype, precision.autocast_dtype) else (
        torch.float16 if precision.scales_loss else None)


def generated_config(cfg: Config, plan: BatchPlan, lr: float, half: torch.dtype | None, device_type: str) -> dict:
    """The DeepSpeed JSON that the Hydra config implies."""
    options = cfg.strategy
    zero: dict = {"stage": options.zero_stage}
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if options.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    # torch's AdamW (fused on CUDA) unless the step runs on the CPU, where DeepSpeed's CPU Adam is the fast one.
    adam = {"lr": lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}
    if not options.offload_optimizer:
        adam["torch_adam"] = True
        if device_type == "cuda":
            adam["fused"] = True
    return {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation_steps,
        "gradient_clipping": cfg.trainer.grad_clip,
        "bf16": {"enabled": half == torch.bfloat16},
        # fp16: DeepSpeed's dynamic loss scaling (loss_scale 0), which skips overflowed steps itself
        "fp16": {"enabled": half == torch.float16, "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the loop logs
        "wall_clock_breakdown": False,
    }


# User keys that must agree with the Hydra config: (JSON path, Hydra key, how to fix).
_MUST_AGREE = (
    (("train_batch_size",), "trainer.global_batch_size", "global batch in sequences"),
    (("train_micro_batch_size_per_gpu",), "trainer.micro_batch_size", "sequences per device"),
    (("gradient_accumulation_steps",), "trainer.global_batch_size",
     "accumulation = global_batch_size / (micro_batch_size x world size)"),
    (("zero_optimization", "stage"), "strategy.zero_stage", "pick the stage with strategy=zero1|zero2|zero3"),
)


def deepspeed_config(cfg: Config, plan: BatchPlan, lr: float, half: torch.dtype | None, device_type: str) -> dict:
    """The generated config with the user's JSON (strategy.deepspeed_config) merged over it."""
    generated = generated_config(cfg, plan, lr, half, device_type)
    path = cfg.strategy.deepspeed_config
    if not path:
        return generated
    key = f"strategy.deepspeed_config={path}"
    try:
        user = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"{key}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{key}: not valid JSON ({err})") from None
    if not isinstance(user, dict):
        raise ValueError(f"{key}: expected a JSON object")
    for json_path, hydra_key, hint in _MUST_AGREE:
        ours, theirs = _get(generated, json_path), _get(user, json_path)
        if theirs not in (None, "auto") and theirs != ours:
            raise ValueError(f"{key}: {'.'.join(json_path)}={theirs} contradicts {hydra_key} "
                             f"(which gives {ours}: {hint}); remove it from the JSON or change {hydra_key}")
    if user.get("scheduler"):
        raise ValueError(f"{key}: has a scheduler; the learning-rate schedule comes from optim.* "
                         f"(schedule, warmup_steps, min_lr_ratio): remove 'scheduler' from the JSON")
    if (user.get("fp16") or {}).get("enabled"):
        raise ValueError(f"{key}: fp16.enabled=true: fp16 comes from the Hydra config; remove it from the JSON "
                         f"and set trainer.precision=fp16_autocast")
    if user.get("managed_gradient_accumulation") is False:
        raise ValueError(f"{key}: managed_gradient_accumulation=false is not supported (the strategy sets the "
                         f"accumulation boundary itself); remove it")
    for json_path in _auto_paths(user):  # transformers-style "auto": ours
        _set(user, json_path, _get(generated, json_path))
    return _merge(generated, user)


def _get(tree: dict, path: tuple[str, ...]):
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = value


def _auto_paths(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in tree.items():
        if isinstance(value, dict):
            paths += _auto_paths(value, (*prefix, key))
        elif value == "auto":
            paths.append((*prefix, key))
    return paths


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def saved_world_size(path: Path) -> int:
    """The data-parallel size that wrote a ZeRO checkpoint: one optimizer partition file per rank (bf16_ in bf16)."""
    return len(list((path / _DS_TAG).glob("*zero_pp_rank_*_optim_states.pt")))


class _ForwardOrLogits(nn.Module):
    """The core behind a single forward, so that ZeRO-3's hooks and parameter discovery also cover `logits`.

    ZeRO-3 gathers a module's parameters around its own forward, and finds parameters
    used elsewhere (the final norm's and LM head's weights, read by fused kernels in the
    root) only during the engine's forward. Evaluation's `logits` is no forward: routing
    it through the engine keeps it correct.
    """

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, *args, logits_only: bool = False, **kwargs):
        return self.core.logits(*args, **kwargs) if logits_only else self.core(*args, **kwargs)


class _EngineView(nn.Module):
    """What evaluation sees under ZeRO-3: `model(**batch)` and `model.logits(ids)`, both through the engine."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def logits(self, *args, **kwargs):
        return self.engine(*args, logits_only=True, **kwargs)


class ZeROStrategy(DataParallelStrategy):
    def __init__(self, cfg: Config, device: torch.device):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported; gloo, no oneCCL
        super().__init__(cfg, device)  # the process group: DeepSpeed reuses it
        import deepspeed

        if device.type == "cpu":
            # DeepSpeed's CPU comm backend would JIT-compile a shared-memory all-reduce (used only for
            # inference, ~90 s on 2 cores) when it starts; training goes through the gloo group.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.deepspeed = deepspeed
        self.stage = cfg.strategy.zero_stage

    def setup(self, model: nn.Module, lr: float) -> nn.Module:
        trainer = self.cfg.trainer
        plan = BatchPlan.resolve(trainer.global_batch_size, trainer.micro_batch_size, self.world_size)
        half = half_dtype(self.cfg, self.device.type)
        # DeepSpeed's bf16/fp16 modes (half) cast floating parameters only
        refuse_4bit_storage_cast(model, half, "DeepSpeed casts floating parameters to", bytes_survive=True)
        self.ds_config = deepspeed_config(self.cfg, plan, lr, half, self.device.type)
        self._core = core_spec(model)
        self.core = model.to(self.device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        engine, _, _, _ = self.deepspeed.initialize(model=_ForwardOrLogits(self.core) if self.stage == 3 else self.core,
                                                    model_parameters=adamw_param_groups(named, self.cfg.optim.weight_decay),
                                                    config=self.ds_config)
        if self.stage == 3:
            # forward reads lm_head.weight directly (chunked cross-entropy), outside lm_head's own forward
            self.deepspeed.zero.register_external_parameter(self.core, self.core.lm_head.weight)
        self.engine = engine
        self.model = engine
        self.optimizer = engine.basic_optimizer  # the torch optimizer whose param_groups hold the lr
        return engine

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(is_last)
        yield

    def grad_scaler(self):
        return None  # DeepSpeed's fp16 mode scales the loss itself

    def backward(self, loss_sum: torch.Tensor, global_target_tokens: torch.Tensor) -> None:
        loss = loss_sum * (self.world_size / global_target_tokens.clamp(min=1))
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, grad_clip: float, loss: torch.Tensor | None = None) -> torch.Tensor:
        """Reduce (stage 1), clip (gradient_clipping from trainer.grad_clip), step, zero.

        The engine decides about non-finite gradients itself (`loss` is not used): ZeRO-1/2
        skip the step, ZeRO-3 outside fp16 applies it; the loop's guard counts such steps
        and stops the run (launcher/guards.py).
        """
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))

    def unwrapped(self) -> nn.Module:
        return _EngineView(self.engine) if self.stage == 3 else self.core

    def parameter_counts(self) -> tuple[int, int]:
        params = list(self.core.parameters())
        count = lambda p: getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty tensor behind
        return sum(map(count, params)), sum(count(p) for p in params if p.requires_grad)

    def export_module(self) -> nn.Module | None:
        if self.stage < 3:
            return self.core if self.is_main else None
        state = {}
        for name, param in self.core.named_parameters():
            with self.deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.is_main:
                    state[name] = param.detach().to("cpu", copy=True)
        return plain_core(self._core, state, quant_states(self.core)) if self.is_main else None

    def save_checkpoint(self, root: Path, step: int, scheduler, trainer_state: dict, keep_last: int) -> Path:
        """DeepSpeed's own (per-rank ZeRO partition) checkpoint, committed like every other."""
        def write_deepspeed(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp), tag=_DS_TAG, save_latest=False)

        return checkpoint.commit(root, step, write_deepspeed, scheduler, trainer_state, self, keep_last)

    def load_checkpoint(self, path: Path, scheduler) -> dict:
        checkpoint.require_committed(path)
        if not (path / _DS_TAG).is_dir():
            raise ValueError(f"trainer.resume={path}: a DCP checkpoint (single/ddp/fsdp/hsdp), not a DeepSpeed one; "
                             f"resume it with one of those strategies, or export the weights (launch export "
                             f"run={path} out=DIR) and start a new run from model.path=DIR")
        saved = saved_world_size(path)
        if saved == self.world_size:
            loaded, _ = self.engine.load_checkpoint(str(path), tag=_DS_TAG, load_lr_scheduler_states=False)
        else:
            loaded = self._load_universal(path, saved)
        if loaded is None:
            raise ValueError(f"trainer.resume={path}: DeepSpeed could not load it (see its log above)")
        return checkpoint.restore_trainer_state(path, scheduler, self.rank)

    def _load_universal(self, path: Path, saved: int):
        """Another data-parallel size: DeepSpeed's universal checkpoint format reshards the ZeRO state.

        Rank 0 converts (deepspeed/checkpoint/ds_to_universal.py) into a hidden sibling
        directory, every rank loads it with load_universal on, rank 0 removes it.
        """
        from deepspeed.checkpoint import ds_to_universal

        universal = path.parent / f".universal-{path.name}"
        if self.is_main:
            log.warning("resharding %s from %d to %d ranks through a DeepSpeed universal checkpoint",
                        path, saved, self.world_size)
            shutil.rmtree(universal, ignore_errors=True)
            # its command-line arguments (parse_arguments reads sys.argv); one worker each: no process
            # pools forked from a training rank
            ds_to_universal.main(argparse.Namespace(
                input_folder=str(path / _DS_TAG), output_folder=str(universal / _DS_TAG), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        self.barrier()
        self.engine._config.load_universal_checkpoint = True  # what {"checkpoint": {"load_universal": true}} sets
        try:
            loaded, _ = self.engine.load_checkpoint(str(universal), tag=_DS_TAG, load_lr_scheduler_states=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
            self.barrier()
            if self.is_main:
                shutil.rmtree(universal, ignore_errors=True)
        # The stage-3 loader gives every partition the same `step` tensor, which torch's AdamW then increments
        # once per partition per step (deepspeed/runtime/zero/stage3.py, _load_universal_checkpoint): unshare it.
        for param_state in self.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
        return loaded
