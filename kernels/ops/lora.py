"""LoRA projections of one input with frozen base weights (twin: reference.lora_projections).

y_i = x W_i^T + b_i + s * dropout(x) A_i^T B_i^T for the projections that share x
(q/k/v, gate/up, or o and down alone). The heavy parts are GEMMs and stay on cuBLAS:
one GEMM reads x for every adapter of the group (A_i stacked to [R, D]), and the
backward never forms a gradient of W. The rank-r GEMMs are memory-bound (they move
a whole [N, out] tensor for 2r FLOPs an element), so they write first and the big
base GEMM accumulates onto them (beta = 1, read in its epilogue): y_i = u_i B_i^T,
then y_i += x W_i^T; in backward dx = du A, then dx += g_i W_i. Adding the small
term afterwards would read and write the output once more. Triton only does what a
GEMM cannot: the dropout mask, drawn from a seed and recomputed in the backward
instead of being stored (no mask tensor).

When activation checkpointing recomputes a block, backward reads what the op saves,
never its outputs: with outputs_read=False it skips the base GEMMs (and QLoRA's
dequantisation) and returns placeholders: for the MLP's down projection of Llama
shapes, about a quarter of the recomputation's projection GEMMs.

Saved for backward: x and u = s * dropout(x) A^T ([N, R], R = r x adapters), plus the
parameters (references, no copies).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from kernels.ops._utils import as_rows, compute_dtype
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


def _grid(n_rows, n_cols):
    return (n_rows, triton.cdiv(n_cols, _BLOCK))


def dropout(x2d: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """The op's dropout of a [rows, cols] input: the same (seed, p) always drops the same elements.

    Also its backward: the gradient through the mask is the same mask applied to the gradient.
    """
    z = torch.empty_like(x2d)
    if z.numel():
        _lora_dropout_fwd_kernel[_grid(*x2d.shape)](x2d, z, x2d.stride(0), z.stride(0), x2d.shape[1], seed, p,
                                                    BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return z


class _LoRAProjectionsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scaling, dropout_p, seed, quant_states, outputs_read, n_proj, *params):
        weights, biases, lora_As, lora_Bs = (params[i * n_proj:(i + 1) * n_proj] for i in range(4))
        dtype = compute_dtype(x)
        cast = lambda t: None if t is None else t.to(dtype)
        adapted = [i for i in range(n_proj) if lora_As[i] is not None]
        ranks = [lora_As[i].shape[0] for i in adapted]
        x2d = as_rows(x.to(dtype))
        with torch.autocast(x.device.type, enabled=False):
            z2d = dropout(x2d, seed, dropout_p) if dropout_p else x2d
            u = z2d @ torch.cat([cast(lora_As[i]) for i in adapted]).t()  # one read of x for every adapter
            u.mul_(scaling)  # [N, R]: the scaling costs nothing here
            del z2d  # recomputed from the seed in backward
            u_parts = dict(zip(adapted, u.split(ranks, dim=1)))
            outs = []
            for i in range(n_proj):
                if not outputs_read:  # zero-stride placeholders of the outputs' shape: nothing is computed
                    out_features = (weights[i] if quant_states[i] is None else quant_states[i]).shape[0]
                    outs.append(x2d.new_zeros(()).expand(*x.shape[:-1], out_features))
                    continue
                w, b = dense_weight(weights[i], dtype, quant_states[i]), cast(biases[i])
                if i in u_parts:  # the adapter's term first; the base GEMM accumulates onto it
                    lora_B = cast(lora_Bs[i]).t()
                    y = u_parts[i] @ lora_B if b is None else torch.addmm(b, u_parts[i], lora_B)
                    y.addmm_(x2d, w.t())
                else:
                    y = x2d @ w.t() if b is None else torch.addmm(b, x2d, w.t())
                outs.append(y.view(*x.shape[:-1], -1))
        ctx.save_for_backward(x2d, u, *params)
        ctx.config = (scaling, dropout_p, seed, quant_states, n_proj, adapted, ranks, dtype, x.shape, x.dtype)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        scaling, dropout_p, seed, quant_states, n_proj, adapted, ranks, dtype, x_shape, x_dtype = ctx.config
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
                d_lora_B[i] = (g.t() @ u_parts[i]).to(lora_Bs[i].dtype)  # u carries the scaling
            du = torch.cat(du_parts, dim=1)
            z2d = dropout(x2d, seed, dropout_p) if dropout_p else x2d
            dA = du.t() @ z2d
            for i, dA_i in zip(adapted, dA.split(ranks, dim=0)):
                d_lora_A[i] = dA_i.to(lora_As[i].dtype)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = du @ torch.cat([cast(lora_As[i]) for i in adapted])  # the adapters' share, written first
                if dropout_p:
                    dx = dropout(dx, seed, dropout_p)
                for g, w, quant_state in zip(grads, weights, quant_states):  # the frozen projections' share
                    if g is not None:
                        dx.addmm_(g, dense_weight(w, dtype, quant_state))
                dx = dx.view(x_shape).to(x_dtype)
        # no gradient for the frozen weights and biases, by contract (checked in lora_projections)
        return (dx, None, None, None, None, None, None, *[None] * (2 * n_proj), *d_lora_A, *d_lora_B)


def lora_projections(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    lora_As: list[torch.Tensor | None],
    lora_Bs: list[torch.Tensor | None],
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    quant_states: Sequence | None = None,
    outputs_read: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Fused twin of `reference.lora_projections` (see there); the mask differs from torch's dropout.

    outputs_read=False (a checkpointed block's recomputation, whose outputs nobody reads):
    the outputs are zero-stride placeholders, and only what backward needs is computed.
    """
    if any(t is not None and t.requires_grad for t in (*weights, *biases)):
        raise ValueError("lora_projections: the base weights and biases must be frozen (requires_grad=False); "
                         "use plain linear layers to train them")
    if all(a is None for a in lora_As):
        raise ValueError("lora_projections: no projection of the group has an adapter; call the linear layers")
    p = dropout_p if training else 0.0
    # The seed comes from torch's CPU generator: manual_seed makes the mask reproducible, and activation
    # checkpointing (which restores the RNG state before recomputing) draws the same one again.
    seed = int(torch.randint(0, 2**31 - 1, ())) if p else 0
    quant_states = tuple(quant_states or [None] * len(weights))
    return _LoRAProjectionsFn.apply(x, scaling, p, seed, quant_states, outputs_read, len(weights), *weights, *biases,
                                    *lora_As, *lora_Bs)
