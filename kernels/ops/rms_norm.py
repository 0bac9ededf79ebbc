"""RMSNorm and fused residual-add + RMSNorm (twins: reference.rms_norm / add_rms_norm).

y = (offset + w) * cast(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), computed in
fp32. The cast back to x's dtype before the weight multiply mirrors the reference
(Hugging Face Llama), so bf16 outputs match it.

Forward: one program per row, the whole row in registers (D up to 64k).
Backward saves only the normalised input (x, or residual + x) and rstd [rows] fp32;
dweight is reduced in fp32: each persistent program sums its rows, then torch sums
the [programs, D] partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops._utils import as_rows, persistent_programs, row_settings


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, S, W, Y, RSTD,
    stride_x, stride_r, stride_s, stride_y,
    n_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # S is the tensor being normalised: residual + x when HAS_RESIDUAL (stored),
    # else the launcher passes X itself. Its dtype is the one the reference casts to.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)  # round as torch's `residual + x` does
        tl.store(S + row * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    normed = (x * rstd).to(S.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    w = (w + offset).to(W.dtype.element_ty).to(tl.float32)  # `offset + weight` keeps w's dtype
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DS, DX, DX2, DW_PARTIAL,
    stride_dy, stride_x, stride_ds, stride_dx, stride_dx2,
    n_rows, n_cols, offset,
    HAS_DS: tl.constexpr, HAS_DX2: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Persistent, grid-stride over rows: each program keeps its dweight partial in
    # fp32 registers and writes it once, so dweight needs no atomics.
    # X is the normalised tensor (x, or the stored residual + x). DS is the upstream
    # gradient of `summed` (add_rms_norm), added to dx. DX2 receives a second copy of
    # dx (the residual's gradient) so the two leaves never share a buffer.
    pid = tl.program_id(0).to(tl.int64)  # int64 row offsets: rows * stride can pass 2^31
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    w = (w + offset).to(W.dtype.element_ty).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for row in range(pid, n_rows, tl.num_programs(0)):
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        if COMPUTE_DW:
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        # The reference rounds d(normed) to x's dtype before the fp32 backward.
        dn = (dy * w).to(X.dtype.element_ty).to(tl.float32)
        dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / n_cols))
        if HAS_DS:
            dx = dx.to(X.dtype.element_ty).to(tl.float32)
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:
            tl.store(DX2 + row * stride_dx2 + cols, dx.to(DX2.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _rms_norm_fwd(x2d, weight, eps, offset, residual2d=None, summed_dtype=None):
    """Returns (y, rstd, summed); summed is None without a residual."""
    n_rows, n_cols = x2d.shape
    block, num_warps = row_settings(n_cols)
    if residual2d is not None:
        summed = torch.empty((n_rows, n_cols), dtype=summed_dtype, device=x2d.device)
        normed_dtype = summed_dtype
    else:
        summed = None
        normed_dtype = x2d.dtype
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(normed_dtype, weight.dtype), device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    if n_rows > 0:
        r = residual2d if residual2d is not None else x2d
        s = summed if summed is not None else x2d
        _rms_norm_fwd_kernel[(n_rows,)](
            x2d, r, s, weight, y, rstd,
            x2d.stride(0), r.stride(0), s.stride(0), y.stride(0),
            n_cols, eps, offset,
            HAS_RESIDUAL=residual2d is not None, BLOCK_D=block, num_warps=num_warps,
        )
    return y, rstd, summed


def _rms_norm_bwd(dy2d, x2d, weight, rstd, offset, dx_dtype, need_dw, ds2d=None, dx2_dtype=None):
    """Returns (dx, dx2, dweight); dx2 is a second gradient buffer (None unless asked)."""
    n_rows, n_cols = x2d.shape
    block, num_warps = row_settings(n_cols)
    dx = torch.empty((n_rows, n_cols), dtype=dx_dtype, device=x2d.device)
    dx2 = None if dx2_dtype is None else torch.empty((n_rows, n_cols), dtype=dx2_dtype, device=x2d.device)
    programs = persistent_programs(x2d.device, n_rows)
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2d.device) if need_dw else None
    if n_rows > 0:
        ds = ds2d if ds2d is not None else dy2d
        out2 = dx2 if dx2 is not None else dx
        _rms_norm_bwd_kernel[(programs,)](
            dy2d, x2d, weight, rstd, ds, dx, out2, partial if need_dw else dx,
            dy2d.stride(0), x2d.stride(0), ds.stride(0), dx.stride(0), out2.stride(0),
            n_rows, n_cols, offset,
            HAS_DS=ds2d is not None, HAS_DX2=dx2 is not None, COMPUTE_DW=need_dw,
            BLOCK_D=block, num_warps=num_warps,
        )
    dweight = None
    if need_dw:
        dweight = (partial.sum(0) if n_rows > 0 else torch.zeros(n_cols, device=x2d.device)).to(weight.dtype)
    return dx, dx2, dweight


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        x2d = as_rows(x)
        weight = weight.contiguous()
        y, rstd, _ = _rms_norm_fwd(x2d, weight, eps, offset)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset = offset
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, _, dw = _rms_norm_bwd(
            as_rows(dy), x2d, weight, rstd, ctx.offset, x2d.dtype, ctx.needs_input_grad[1]
        )
        return dx.view(ctx.x_shape), dw, None, None


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, x, weight, eps, offset):
        if residual.shape != x.shape:
            raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
        weight = weight.contiguous()
        summed_dtype = torch.promote_types(residual.dtype, x.dtype)
        y, rstd, summed = _rms_norm_fwd(as_rows(x), weight, eps, offset, as_rows(residual), summed_dtype)
        ctx.save_for_backward(summed, weight, rstd)
        ctx.offset = offset
        ctx.dtypes = (residual.dtype, x.dtype)
        ctx.set_materialize_grads(False)
        return summed.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, d_summed, d_normed):
        summed, weight, rstd = ctx.saved_tensors
        need_res, need_x, need_w = ctx.needs_input_grad[:3]
        res_dtype, x_dtype = ctx.dtypes
        if d_normed is None:  # only `summed` was used downstream
            if d_summed is None:
                return None, None, None, None, None
            return (d_summed.to(res_dtype) if need_res else None,
                    d_summed.to(x_dtype, copy=True) if need_x else None, None, None, None)
        shape = d_normed.shape
        # The kernel writes x's gradient and, when both want one, a second buffer for
        # the residual (the same values: d(residual + x) is shared).
        first_dtype = x_dtype if need_x else res_dtype
        d_first, d_res, dw = _rms_norm_bwd(
            as_rows(d_normed), summed, weight, rstd, ctx.offset, first_dtype, need_w,
            ds2d=as_rows(d_summed) if d_summed is not None else None,
            dx2_dtype=res_dtype if (need_res and need_x) else None,
        )
        d_x = d_first if need_x else None
        if not need_x:
            d_res = d_first if need_res else None
        return (d_res.view(shape) if d_res is not None else None,
                d_x.view(shape) if d_x is not None else None, dw, None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Triton twin of `reference.rms_norm` (any leading dims; offset=1.0 for Gemma)."""
    return _RMSNormFn.apply(x, weight, float(eps), float(offset))


def add_rms_norm(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.add_rms_norm`: (residual + x, rms_norm(residual + x))."""
    return _AddRMSNormFn.apply(residual, x, weight, float(eps), float(offset))
