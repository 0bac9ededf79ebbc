"""Small helpers shared by the Triton op files (launch settings, row views)."""
from __future__ import annotations

import functools

import torch
import triton

# One program holds a whole row in registers (RMSNorm); past this the row would
# spill, so we refuse instead of running slowly.
MAX_FUSED_COLS = 65536


def row_settings(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for kernels that keep one whole row of n_cols in registers.

    num_warps grows with the row so each thread holds about 16-32 fp32 values
    (Liger/Unsloth use the same steps on Ampere/Hopper).
    """
    block = triton.next_power_of_2(n_cols)
    if block > MAX_FUSED_COLS:
        raise ValueError(f"feature dim {n_cols} is larger than the fused kernels support ({MAX_FUSED_COLS})")
    num_warps = 4
    if block >= 2048:
        num_warps = 8
    if block >= 8192:
        num_warps = 16
    if block >= 32768:
        num_warps = 32
    return block, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, n_rows: int) -> int:
    """Programs for a persistent (grid-stride) reduction: four per SM on CUDA.

    One program per SM walks its rows one at a time and leaves the memory system
    idle between loads (the H100 profile showed the RMSNorm backward at a third of
    the bandwidth); four in flight per SM hide that latency for a few MB of partials.
    On CPU (Triton's interpreter) a handful is enough and keeps tests fast.
    """
    if device.type == "cuda":
        sms = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = 4
    return max(1, min(n_rows, sms))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [rows, last_dim] with a unit stride along the last dim.

    A view when the leading dims merge (slices of fused projections do), a copy
    otherwise; kernels then take the row stride as an argument.
    """
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return x2d


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What nn.Linear would compute in: the autocast dtype inside autocast, else x's dtype."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
