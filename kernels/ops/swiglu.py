"""SwiGLU activation silu(gate) * up (twin: reference.swiglu).

Elementwise over [rows, cols] tiles: program (row, column block). gate/up may be
row-strided views (the two halves of a fused gate_up projection), so the kernels
take row strides instead of copying. Backward saves gate and up only and
recomputes sigmoid/silu. `swiglu_linear` adds the MLP's down projection, so that
the activation it reads is not kept for backward either (it is as large as gate).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops._utils import as_rows, compute_dtype

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
    DO, G, U, DG, DU, H, stride_do, stride_g, stride_u, stride_dg, stride_du, stride_h, n_cols,
    BLOCK: tl.constexpr, STORE_H: tl.constexpr,
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
    if STORE_H:  # the forward's output again, bit for bit (swiglu_linear's weight gradient reads it)
        tl.store(H + row * stride_h + cols, (silu * u).to(H.dtype.element_ty), mask=mask)


def _grid(n_rows, n_cols):
    return (n_rows, triton.cdiv(n_cols, _BLOCK))


def _forward(g2d: torch.Tensor, u2d: torch.Tensor) -> torch.Tensor:
    n_rows, n_cols = g2d.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.promote_types(g2d.dtype, u2d.dtype), device=g2d.device)
    if out.numel():
        _swiglu_fwd_kernel[_grid(n_rows, n_cols)](
            g2d, u2d, out, g2d.stride(0), u2d.stride(0), out.stride(0), n_cols,
            BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )
    return out


def _backward(do2d, g2d, u2d, recompute_out: bool):
    """(d gate, d up, and with recompute_out the forward's output, else None) in one pass."""
    n_rows, n_cols = g2d.shape
    dg = torch.empty((n_rows, n_cols), dtype=g2d.dtype, device=g2d.device)
    du = torch.empty((n_rows, n_cols), dtype=u2d.dtype, device=u2d.device)
    out = torch.empty_like(dg, dtype=torch.promote_types(g2d.dtype, u2d.dtype)) if recompute_out else None
    h = dg if out is None else out  # written only with STORE_H
    if dg.numel():
        _swiglu_bwd_kernel[_grid(n_rows, n_cols)](
            do2d, g2d, u2d, dg, du, h,
            do2d.stride(0), g2d.stride(0), u2d.stride(0), dg.stride(0), du.stride(0), h.stride(0), n_cols,
            BLOCK=_BLOCK, STORE_H=recompute_out, num_warps=_NUM_WARPS,
        )
    return dg, du, out


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g2d, u2d = as_rows(gate), as_rows(up)
        ctx.save_for_backward(g2d, u2d)
        ctx.shape = gate.shape
        return _forward(g2d, u2d).view(gate.shape)

    @staticmethod
    def backward(ctx, d_out):
        g2d, u2d = ctx.saved_tensors
        dg, du, _ = _backward(as_rows(d_out), g2d, u2d, recompute_out=False)
        return dg.view(ctx.shape), du.view(ctx.shape)


class _SwiGLULinearFn(torch.autograd.Function):
    """swiglu(gate, up) @ weight^T saving gate, up and weight only: the activation (as large as
    gate) lives during the GEMM, and backward's SwiGLU kernel writes it again for the weight's
    gradient. output_read=False (a checkpointed block's recomputation): neither is computed."""

    @staticmethod
    def forward(ctx, gate, up, weight, output_read):
        dtype = compute_dtype(gate)
        g2d, u2d = as_rows(gate), as_rows(up)
        ctx.save_for_backward(g2d, u2d, weight)
        ctx.dtype, ctx.shape = dtype, gate.shape
        if not output_read:  # a zero-stride placeholder of the output's shape
            return g2d.new_zeros((), dtype=dtype).expand(*gate.shape[:-1], weight.shape[0])
        with torch.autocast(gate.device.type, enabled=False):
            out = _forward(g2d, u2d).to(dtype) @ weight.to(dtype).t()
        return out.view(*gate.shape[:-1], -1)

    @staticmethod
    def backward(ctx, d_out):
        g2d, u2d, weight = ctx.saved_tensors
        needs_weight_grad = ctx.needs_input_grad[2]
        with torch.autocast(g2d.device.type, enabled=False):
            do2d = as_rows(d_out.to(ctx.dtype))
            d_act = do2d @ weight.to(ctx.dtype)
            dg, du, act = _backward(d_act, g2d, u2d, recompute_out=needs_weight_grad)
            del d_act
            d_weight = (do2d.t() @ act.to(ctx.dtype)).to(weight.dtype) if needs_weight_grad else None
        return dg.view(ctx.shape), du.view(ctx.shape), d_weight, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton twin of `reference.swiglu`: silu(gate) * up, any leading dims."""
    _check_shapes(gate, up)
    return _SwiGLUFn.apply(gate, up)


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, output_read: bool = True) -> torch.Tensor:
    """Triton twin of `reference.swiglu_linear`: the MLP's down projection of swiglu(gate, up)."""
    _check_shapes(gate, up)
    if weight.shape[-1] != gate.shape[-1]:
        raise ValueError(f"swiglu_linear: weight {tuple(weight.shape)} does not take gate's {gate.shape[-1]} features")
    return _SwiGLULinearFn.apply(gate, up, weight, output_read)


def _check_shapes(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
