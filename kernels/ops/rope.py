"""Rotary position embedding, rotate-half convention (twin: reference.apply_rope).

With x = [x1, x2] split at half the head dim and cos = [c1, c2], sin = [s1, s2]:
    out1 = x1 * c1 - x2 * s1        out2 = x2 * c2 + x1 * s2
The backward is the transpose of that map:
    dx1 = d1 * c1 + d2 * s2         dx2 = d2 * c2 - d1 * s1
i.e. the same rotation with (s1, s2) -> (-s2, -s1); for real RoPE tables
(c1 == c2, s1 == s2) that is the rotation by -sin. Using the exact transpose keeps
the gradient right for any cos/sin the reference accepts.

One program per (batch, token) rotates all q heads and all k heads (GQA: different
head counts), loading that token's cos/sin row once. Inputs may be strided views
(e.g. slices of a fused qkv projection); outputs are fresh contiguous tensors, so
the caller's q/k are never modified. Nothing is saved but cos/sin.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_rotate_heads(
    X, O, x_off, o_off, sx_h, sx_d, so_h, n_heads, half, c1, c2, sa, sb,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # o1 = x1 * c1 - x2 * sa ; o2 = x2 * c2 + x1 * sb on a [heads, half] tile.
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < n_heads) & (d < half)
    x_ptr = X + x_off + h * sx_h + d * sx_d
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half * sx_d, mask=mask, other=0.0).to(tl.float32)
    o_ptr = O + o_off + h * so_h + d  # outputs are contiguous along the head dim
    tl.store(o_ptr, (x1 * c1 - x2 * sa).to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptr + half, (x2 * c2 + x1 * sb).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_load_table(COS, SIN, QO, b, t, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d, half, BLOCK_HALF: tl.constexpr):
    # The reference casts cos/sin to q's dtype before multiplying: round the same way.
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = d < half
    c_ptr = COS + b * sc_b + t * sc_t + d * sc_d
    s_ptr = SIN + b * ss_b + t * ss_t + d * ss_d
    ty = QO.dtype.element_ty
    c1 = tl.load(c_ptr, mask=mask, other=0.0).to(ty).to(tl.float32)
    c2 = tl.load(c_ptr + half * sc_d, mask=mask, other=0.0).to(ty).to(tl.float32)
    s1 = tl.load(s_ptr, mask=mask, other=0.0).to(ty).to(tl.float32)
    s2 = tl.load(s_ptr + half * ss_d, mask=mask, other=0.0).to(ty).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rope_fwd_kernel(
    Q, K, COS, SIN, QO, KO,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
    sqo_b, sqo_t, sqo_h, sko_b, sko_t, sko_h,
    sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
    T, n_q_heads, n_k_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    c1, c2, s1, s2 = _rope_load_table(COS, SIN, QO, b, t, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d, half, BLOCK_HALF)
    _rope_rotate_heads(Q, QO, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t, sq_h, sq_d, sqo_h,
                       n_q_heads, half, c1, c2, s1, s2, BLOCK_HQ, BLOCK_HALF)
    _rope_rotate_heads(K, KO, b * sk_b + t * sk_t, b * sko_b + t * sko_t, sk_h, sk_d, sko_h,
                       n_k_heads, half, c1, c2, s1, s2, BLOCK_HK, BLOCK_HALF)


@triton.jit
def _rope_bwd_kernel(
    DQO, DKO, COS, SIN, DQ, DK,
    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
    sqo_b, sqo_t, sqo_h, sko_b, sko_t, sko_h,
    sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
    T, n_q_heads, n_k_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # Same walk as the forward over the upstream gradients, with the transposed
    # rotation: (s1, s2) -> (-s2, -s1).
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    c1, c2, s1, s2 = _rope_load_table(COS, SIN, DQ, b, t, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d, half, BLOCK_HALF)
    _rope_rotate_heads(DQO, DQ, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t, sq_h, sq_d, sqo_h,
                       n_q_heads, half, c1, c2, -s2, -s1, BLOCK_HQ, BLOCK_HALF)
    _rope_rotate_heads(DKO, DK, b * sk_b + t * sk_t, b * sko_b + t * sko_t, sk_h, sk_d, sko_h,
                       n_k_heads, half, c1, c2, -s2, -s1, BLOCK_HK, BLOCK_HALF)


def _rope_launch(kernel, q, k, cos, sin, q_dtype, k_dtype):
    """Run `kernel` over [B, T, H, Dh] q/k (any strides); returns contiguous outputs."""
    B, T, n_q, head_dim = q.shape
    n_k = k.shape[2]
    half = head_dim // 2
    qo = torch.empty((B, T, n_q, head_dim), dtype=q_dtype, device=q.device)
    ko = torch.empty((B, T, n_k, head_dim), dtype=k_dtype, device=k.device)
    if B * T == 0:
        return qo, ko
    block_hq, block_hk = triton.next_power_of_2(n_q), triton.next_power_of_2(n_k)
    block_half = triton.next_power_of_2(half)
    # ~8 values of each half-tile per thread: 32 heads x 64 -> 8 warps, 80 registers
    # on sm_90 (4 warps needs 128 and halves occupancy for this memory-bound kernel).
    num_warps = max(1, min(16, block_hq * block_half // 256))
    kernel[(B * T,)](
        q, k, cos, sin, qo, ko,
        *q.stride(), *k.stride(),
        *qo.stride()[:3], *ko.stride()[:3],
        *cos.stride(), *sin.stride(),
        T, n_q, n_k, half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, num_warps=num_warps,
    )
    return qo, ko


class _RoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        k_dtype = torch.promote_types(k.dtype, q.dtype)  # the reference multiplies k by q-dtype tables
        q_out, k_out = _rope_launch(_rope_fwd_kernel, q, k, cos, sin, q.dtype, k_dtype)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        q_dtype, k_dtype = ctx.dtypes
        dq, dk = _rope_launch(_rope_bwd_kernel, dq_out, dk_out, cos, sin, q_dtype, k_dtype)
        return dq, dk, None, None


def apply_rope(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.apply_rope`; cos/sin [B or 1, T, Dh] are constants."""
    if q_BTHD.dim() != 4 or k_BTHD.dim() != 4:
        raise ValueError(
            f"apply_rope: q and k must be [B, T, H, Dh], got {tuple(q_BTHD.shape)} and {tuple(k_BTHD.shape)}"
        )
    B, T, _, head_dim = q_BTHD.shape
    if k_BTHD.shape[:2] != q_BTHD.shape[:2] or k_BTHD.shape[3] != head_dim or head_dim % 2:
        raise ValueError(
            f"apply_rope: q {tuple(q_BTHD.shape)} and k {tuple(k_BTHD.shape)} need the same B, T and an even head dim"
        )
    if torch.is_grad_enabled() and (cos_BTD.requires_grad or sin_BTD.requires_grad):
        raise ValueError(
            "apply_rope: the Triton kernel treats cos/sin as constants; detach them (or use model.kernels=torch)"
        )
    # Broadcast [1, T, Dh] over the batch with stride 0 instead of copying.
    cos = cos_BTD.expand(B, T, head_dim)
    sin = sin_BTD.expand(B, T, head_dim)
    return _RoPEFn.apply(q_BTHD, k_BTHD, cos, sin)
