"""SwiGLU activation silu(gate) * up (twin: reference.swiglu).

Elementwise over [rows, cols] tiles: program (row, column block). gate/up may be
row-strided views (the two halves of a fused gate_up projection), so the kernels
take row strides instead of copying. Backward saves gate and up only and
recomputes sigmoid/silu, so the MLP keeps no extra activation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops._utils import as_rows

# 1024 elements x 4 warps: 8 per thread, 16-byte bf16 vectors; enough per program to
# hide latency while keeping the grid large for any MLP width.
_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(G, U, O, stride_g, stride_u, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)  # F.silu rounds to gate's dtype
    tl.store(O + row * stride_o + cols, (silu * u).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DO, G, U, DG, DU, stride_do, stride_g, stride_u, stride_dg, stride_du, n_cols, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    do = tl.load(DO + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = (g * sig).to(G.dtype.element_ty).to(tl.float32)
    dsilu = (do * u).to(G.dtype.element_ty).to(tl.float32)
    # d silu / dg = sig * (1 + g * (1 - sig))
    tl.store(DG + row * stride_dg + cols, (dsilu * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (do * silu).to(DU.dtype.element_ty), mask=mask)


def _grid(n_rows, n_cols):
    return (n_rows, triton.cdiv(n_cols, _BLOCK))


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g2d, u2d = as_rows(gate), as_rows(up)
        n_rows, n_cols = g2d.shape
        out = torch.empty((n_rows, n_cols), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        if out.numel():
            _swiglu_fwd_kernel[_grid(n_rows, n_cols)](
                g2d, u2d, out, g2d.stride(0), u2d.stride(0), out.stride(0), n_cols,
                BLOCK=_BLOCK, num_warps=_NUM_WARPS,
            )
        ctx.save_for_backward(g2d, u2d)
        ctx.shape = gate.shape
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, d_out):
        g2d, u2d = ctx.saved_tensors
        do2d = as_rows(d_out)
        n_rows, n_cols = g2d.shape
        dg = torch.empty((n_rows, n_cols), dtype=g2d.dtype, device=g2d.device)
        du = torch.empty((n_rows, n_cols), dtype=u2d.dtype, device=u2d.device)
        if dg.numel():
            _swiglu_bwd_kernel[_grid(n_rows, n_cols)](
                do2d, g2d, u2d, dg, du,
                do2d.stride(0), g2d.stride(0), u2d.stride(0), dg.stride(0), du.stride(0), n_cols,
                BLOCK=_BLOCK, num_warps=_NUM_WARPS,
            )
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton twin of `reference.swiglu`: silu(gate) * up, any leading dims."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return _SwiGLUFn.apply(gate, up)
