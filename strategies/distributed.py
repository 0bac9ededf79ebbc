"""Process-group plumbing shared by the data-parallel strategies (DDP, FSDP2, DeepSpeed).

One process per device, started by torchrun, srun or `launch` (which runs torchrun):
RANK, LOCAL_RANK and WORLD_SIZE come from the environment. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from kernels.models.lora import apply_lora, quant_states
from kernels.reference import dense_weight
from launcher.config import Config
from strategies.base import Strategy


def init_process_group(device: torch.device) -> tuple[int, int]:
    """Join (or reuse) the default process group; returns (rank, world size)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            # A lone process (tests, `launch` with one process): a group of one on a free port.
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Leave the process group once every rank is done with it.

    Without the barrier a rank that finishes first tears down its connections while
    a peer still has collectives in flight (e.g. the export gather). The groups that a
    DeviceMesh or FSDP state still references die only when their reference cycles
    are collected: collect now, while gloo's worker threads can still take the GIL,
    not in interpreter finalisation, where they abort the process ("terminate called
    without an active exception"). Call it only on success: after an error the peers
    may never reach the barrier.
    """
    import gc

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DataParallelStrategy(Strategy):
    """Rank, world size, all-reduce and barrier over the default process group."""

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        self.rank, self.world_size = init_process_group(device)

    def background_group(self):
        """A gloo group of its own for dcp.async_save's thread: never the communicator training uses."""
        if not hasattr(self, "_background_group"):
            self._background_group = dist.new_group(backend="gloo")
        return self._background_group

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.device, copy=True)  # NCCL reduces device tensors only; counts may come from the CPU
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        dist.barrier()


def core_spec(model: torch.nn.Module) -> tuple:
    """What `plain_core` needs to rebuild `model`: class, config, ops and its LoRA spec (None without adapters)."""
    return type(model), model.config, model.ops, getattr(model, "lora_spec", None)


def refuse_4bit_storage_cast(model: torch.nn.Module, cast_dtype: torch.dtype | None, caster: str,
                             bytes_survive: bool) -> None:
    """ValueError, naming the key, if the strategy would cast QLoRA's packed 4-bit bytes to `cast_dtype`.

    None casts nothing. Storage already of that dtype is safe (a cast to itself copies
    nothing); uint8 storage also where `bytes_survive` (the caster leaves non-floating
    parameters alone).
    """
    if cast_dtype is None:
        return
    params = dict(model.named_parameters())
    for name in quant_states(model):
        dtype = params[name].dtype
        if dtype == cast_dtype or (bytes_survive and not dtype.is_floating_point):
            continue
        fixes = [_short(cast_dtype), "uint8"] if bytes_survive else ["auto"]
        raise ValueError(f"peft.bnb_4bit_quant_storage={_short(dtype)}: {caster} {_short(cast_dtype)} here and "
                         f"would scramble the packed 4-bit bytes; set peft.bnb_4bit_quant_storage="
                         f"{' or '.join(fixes)}")


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plain_core(spec: tuple, state: dict[str, torch.Tensor], quant_states: dict | None = None) -> torch.nn.Module:
    """A fresh, unwrapped model core (`core_spec`) holding the full tensors of `state` (on CPU).

    QLoRA's 4-bit storage in `state` (the names in `quant_states`) is dequantised: the core
    is a LoRA core over dense weights, which export merges and writes like any other.
    """
    cls, config, ops, lora_spec = spec
    dense_dtype = state["model.embed_tokens.weight"].dtype
    for name, quant_state in (quant_states or {}).items():
        storage = state[name].to(quant_state.absmax.device)
        state[name] = dense_weight(storage, quant_state=quant_state).to("cpu", dense_dtype)
    with torch.device("meta"):
        core = cls(config, ops)
        if lora_spec is not None:
            apply_lora(core, lora_spec)
    missing, unexpected = core.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        core.lm_head.weight = core.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    core.reset_rope("cpu")
    return core.eval()
