"""LoRA projections of one input with frozen base weights (twin: reference.lora_projections).

y_i = x W_i^T + b_i + s * dropout(x) A_i^T B_i^T for the projections that share x
(q/k/v, gate/up, or o and down alone). The heavy parts are GEMMs and stay on cuBLAS:
one GEMM reads x for every adapter of the group (A_i stacked to [R, D]), the
scaling s rides in the alpha of the small B GEMM, and the backward never forms a
gradient of W. Triton only does what a GEMM cannot: the dropout mask, drawn from a
seed and recomputed in the backward instead of being stored, and applied to the
adapter's input gradient while adding it into dx (one pass, no mask tensor).

Saved for backward: x and u = dropout(x) A^T ([N, R], R = r x adapters), plus the
parameters (references, no copies).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops._utils import as_rows
from kernels.reference import dense_weight

# Elementwise over [rows, cols]: 1024 elements x 4 warps, as in swiglu.
_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _lora_dropout_fwd_kernel(X, Z, stride_x, stride_z, n_cols, seed, p, BLOCK: tl.constexpr):
    """z = x * keep / (1 - p); keep is a pure function of (seed, element index)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    keep = tl.rand(seed, row * n_cols + cols) >= p
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Z + row * stride_z + cols, tl.where(keep, x / (1.0 - p), 0.0).to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _lora_dropout_bwd_kernel(DX, DZ, stride_dx, stride_dz, n_cols, seed, p, BLOCK: tl.constexpr):
    """dx += dz * keep / (1 - p), in place: the adapter's share of the input gradient."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    keep = tl.rand(seed, row * n_cols + cols) >= p
    dz = tl.load(DZ + row * stride_dz + cols, mask=mask, other=0.0).to(tl.float32)
    dx = tl.load(DX + row * stride_dx + cols, mask=mask, other=0.0).to(tl.float32)
    dx += tl.where(keep, dz / (1.0 - p), 0.0)
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _grid(n_rows, n_cols):
    return (n_rows, triton.cdiv(n_cols, _BLOCK))


def dropout(x2d: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """The op's dropout of a [rows, cols] input: the same (seed, p) always drops the same elements."""
    z = torch.empty_like(x2d)
    if z.numel():
        _lora_dropout_fwd_kernel[_grid(*x2d.shape)](x2d, z, x2d.stride(0), z.stride(0), x2d.shape[1], seed, p,
                                                    BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return z


def _add_dropout_grad_(dx2d: torch.Tensor, dz2d: torch.Tensor, seed: int, p: float) -> None:
    if dx2d.numel():
        _lora_dropout_bwd_kernel[_grid(*dx2d.shape)](dx2d, dz2d, dx2d.stride(0), dz2d.stride(0), dx2d.shape[1],
                                                     seed, p, BLOCK=_BLOCK, num_warps=_NUM_WARPS)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What nn.Linear would compute in: the autocast dtype inside autocast, else x's dtype."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class _LoRAProjectionsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scaling, dropout_p, seed, n_proj, *params):
        weights, biases, lora_As, lora_Bs = (params[i * n_proj:(i + 1) * n_proj] for i in range(4))
        dtype = _compute_dtype(x)
        cast = lambda t: None if t is None else t.to(dtype)
        adapted = [i for i in range(n_proj) if lora_As[i] is not None]
        ranks = [lora_As[i].shape[0] for i in adapted]
        x2d = as_rows(x.to(dtype))
        with torch.autocast(x.device.type, enabled=False):
            z2d = dropout(x2d, seed, dropout_p) if dropout_p else x2d
            u = z2d @ torch.cat([cast(lora_As[i]) for i in adapted]).t()  # one read of x for every adapter
            del z2d  # recomputed from the seed in backward
            u_parts = dict(zip(adapted, u.split(ranks, dim=1)))
            outs = []
            for i in range(n_proj):
                w, b = dense_weight(weights[i], dtype).to(dtype), cast(biases[i])
                y = x2d @ w.t() if b is None else torch.addmm(b, x2d, w.t())
                if i in u_parts:
                    y.addmm_(u_parts[i], cast(lora_Bs[i]).t(), alpha=scaling)
                outs.append(y.view(*x.shape[:-1], -1))
        ctx.save_for_backward(x2d, u, *params)
        ctx.config = (scaling, dropout_p, seed, n_proj, adapted, ranks, dtype, x.shape, x.dtype)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        scaling, dropout_p, seed, n_proj, adapted, ranks, dtype, x_shape, x_dtype = ctx.config
        x2d, u, *params = ctx.saved_tensors
        weights, _, lora_As, lora_Bs = (params[i * n_proj:(i + 1) * n_proj] for i in range(4))
        cast = lambda t: t.to(dtype)
        grads = [None if g is None else as_rows(g.to(dtype)) for g in grad_outs]
        u_parts = dict(zip(adapted, u.split(ranks, dim=1)))
        d_lora_A, d_lora_B = [None] * n_proj, [None] * n_proj
        with torch.autocast(x2d.device.type, enabled=False):
            du_parts = []
            for i in adapted:
                g, lora_B = grads[i], cast(lora_Bs[i])
                if g is None:  # an unused output: its adapter gets zero gradients
                    g = torch.zeros(x2d.shape[0], lora_B.shape[0], dtype=dtype, device=x2d.device)
                du_parts.append((g @ lora_B).mul_(scaling))
                d_lora_B[i] = (g.t() @ u_parts[i]).mul_(scaling).to(lora_Bs[i].dtype)
            du = torch.cat(du_parts, dim=1)
            z2d = dropout(x2d, seed, dropout_p) if dropout_p else x2d
            dA = du.t() @ z2d
            for i, dA_i in zip(adapted, dA.split(ranks, dim=0)):
                d_lora_A[i] = dA_i.to(lora_As[i].dtype)
            dx = None
            if ctx.needs_input_grad[0]:
                A_cat = torch.cat([cast(lora_As[i]) for i in adapted])
                if dropout_p:
                    dx = _base_input_grad(grads, weights, dtype, x2d)
                    _add_dropout_grad_(dx, du @ A_cat, seed, dropout_p)
                else:  # the adapter's share rides in the last GEMM's accumulate
                    dx = _base_input_grad(grads, weights, dtype, x2d).addmm_(du, A_cat)
                dx = dx.view(x_shape).to(x_dtype)
        # no gradient for the frozen weights and biases, by contract (checked in lora_projections)
        return (dx, None, None, None, None, *[None] * (2 * n_proj), *d_lora_A, *d_lora_B)


def _base_input_grad(grads, weights, dtype, x2d) -> torch.Tensor:
    """sum_i g_i W_i: the frozen projections' share of dx (zeros when no output is used)."""
    dx = None
    for g, w in zip(grads, weights):
        if g is not None:
            w = dense_weight(w, dtype).to(dtype)
            dx = g @ w if dx is None else dx.addmm_(g, w)
    return torch.zeros_like(x2d) if dx is None else dx


def lora_projections(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    lora_As: list[torch.Tensor | None],
    lora_Bs: list[torch.Tensor | None],
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Fused twin of `reference.lora_projections` (see there); the mask differs from torch's dropout."""
    if any(t is not None and t.requires_grad for t in (*weights, *biases)):
        raise ValueError("lora_projections: the base weights and biases must be frozen (requires_grad=False); "
                         "use plain linear layers to train them")
    if all(a is None for a in lora_As):
        raise ValueError("lora_projections: no projection of the group has an adapter; call the linear layers")
    p = dropout_p if training else 0.0
    # The seed comes from torch's CPU generator: manual_seed makes the mask reproducible, and activation
    # checkpointing (which restores the RNG state before recomputing) draws the same one again.
    seed = int(torch.randint(0, 2**31 - 1, ())) if p else 0
    return _LoRAProjectionsFn.apply(x, scaling, p, seed, len(weights), *weights, *biases, *lora_As, *lora_Bs)
