"""Fused lm_head + cross-entropy (twin: reference.linear_cross_entropy).

The [N, V] logits are never materialised whole. Tokens are processed in chunks of C
rows, C chosen so the [C, V] block in the input dtype stays under LOGITS_CHUNK_BYTES
(256 MiB; 1024 rows at V = 128k in bf16). For each chunk, in the forward:
  1. logits = h_chunk @ W^T (cuBLAS, in the input dtype like the reference's matmul,
     into one reused [C, V] buffer);
  2. one Triton program per row does an online-softmax pass for the log-sum-exp and
     the loss, then a second pass writes d(loss)/d(logits) = softmax - onehot in
     place over the logits (zeros for ignored rows);
  3. grad_h[chunk] = dlogits @ W, grad_W += dlogits^T @ h_chunk.
Gradients are thus finished in the forward (as Liger does) and the backward only
scales them by the upstream gradient of loss_sum (a Triton kernel, in place).

grad_W accumulates in W's own dtype, inside the GEMM (beta = 1: fp32 arithmetic,
one rounding per chunk). Large chunks keep that to a few roundings and keep the
GEMMs efficient; an fp32 accumulator would cost V*D*4 bytes (1 GiB for a 128k x 2k
head) and twice the memory traffic per chunk, which profiling showed dominated the
op. A frozen W (LoRA) gets no grad_W at all, and a hidden that does not require
grad gets no grad_h GEMM.

Memory beyond the inputs and grad_W: the [C, V] buffer (input dtype), grad_h [N, D]
and a [N] fp32 per-token loss.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100

# Budget for the [C, V] logits buffer in the input dtype: 256 MiB is 1024 rows of a
# 128k vocabulary in bf16 (2048 rows put the 1B benchmark's peak 0.4 GiB above
# Liger's). Tests shrink it to exercise the chunk loop.
LOGITS_CHUNK_BYTES = 256 * 2**20
# Vocabulary tile of the softmax passes: 4096 fp32 over 8 warps, 16 values/thread.
_BLOCK_V = 4096
_CE_NUM_WARPS = 8
# In-place gradient scaling in the backward.
_SCALE_BLOCK = 4096


@triton.jit
def _linear_cross_entropy_fwd_kernel(
    LOGITS, LABELS, LOSS, stride_l, n_cols, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_l
    label = tl.load(LABELS + row)
    ignored = label == ignore_index
    # Pass 1: running max m and running sum d of exp(x - m) over vocabulary tiles.
    m = tl.full([], float("-inf"), tl.float32)
    d = tl.zeros([], tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    safe_label = tl.where(ignored, 0, label)
    target = tl.load(ptr + safe_label).to(tl.float32)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - target))
    if COMPUTE_GRAD:
        # Pass 2: overwrite the logits with softmax - onehot (0 for ignored rows).
        keep = tl.where(ignored, 0.0, 1.0)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(cols == safe_label, p - 1.0, p) * keep
            tl.store(ptr + cols, p.to(LOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _linear_cross_entropy_bwd_kernel(GRAD, SCALE, n, BLOCK: tl.constexpr):
    # grad *= d(loss)/d(loss_sum), read from device memory: no host sync.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(SCALE).to(tl.float32)
    g = tl.load(GRAD + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(GRAD + offs, (g * scale).to(GRAD.dtype.element_ty), mask=mask)


def _chunk_rows(n_rows: int, vocab: int, itemsize: int) -> int:
    rows = max(1, LOGITS_CHUNK_BYTES // (vocab * itemsize))
    if rows >= 128:
        rows -= rows % 128  # whole GEMM tiles
    return max(1, min(n_rows, rows))


def _ce_rows(logits, labels, loss, ignore_index, compute_grad):
    """Loss per row of `logits` into `loss`; with compute_grad, dlogits in place."""
    n_rows, vocab = logits.shape
    _linear_cross_entropy_fwd_kernel[(n_rows,)](
        logits, labels, loss, logits.stride(0), vocab, ignore_index,
        COMPUTE_GRAD=compute_grad, BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(vocab)),
        num_warps=_CE_NUM_WARPS,
    )


def _scale_(grad, scale):
    """grad *= scale in place; grad is a contiguous buffer we own, scale a 1-element tensor."""
    n = grad.numel()
    if n:
        grid = (triton.cdiv(n, _SCALE_BLOCK),)
        _linear_cross_entropy_bwd_kernel[grid](grad, scale, n, BLOCK=_SCALE_BLOCK, num_warps=8)
    return grad


def _forward(hidden, weight, labels, ignore_index, need_dh, need_dw):
    """(loss_sum, n_tokens, grad_h, grad_W); the grads are for an upstream gradient of 1."""
    n_rows, _ = hidden.shape
    vocab = weight.shape[0]
    valid = labels != ignore_index
    torch._assert_async(  # like F.cross_entropy: a label outside [0, V) is an error
        ~(valid & ((labels < 0) | (labels >= vocab))).any(),
        "linear_cross_entropy: a label is outside [0, vocab) and is not ignore_index",
    )
    loss = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # every row is written
    chunk = _chunk_rows(n_rows, vocab, hidden.element_size())
    logits_buf = torch.empty((min(chunk, n_rows), vocab), dtype=hidden.dtype, device=hidden.device)
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_dh else None
    grad_w = None
    if need_dw:
        grad_w = (torch.zeros if n_rows == 0 else torch.empty)(weight.shape, dtype=weight.dtype,
                                                                device=weight.device)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]
        logits = logits_buf[: end - start]
        torch.mm(h, weight.t(), out=logits)
        _ce_rows(logits, labels[start:end], loss[start:end], ignore_index, need_dh or need_dw)
        if need_dh:
            torch.mm(logits, weight, out=grad_h[start:end])
        if need_dw:
            beta = 0.0 if start == 0 else 1.0  # the first chunk overwrites the empty buffer
            grad_w.addmm_(logits.t(), h, beta=beta)
    return loss.sum(), valid.sum(), grad_h, grad_w


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):  # operands are cast already; keep out= GEMMs
            loss_sum, n_tokens, grad_h, grad_w = _forward(hidden, weight, labels, ignore_index, need_dh, need_dw)
        ctx.grads = (grad_h, grad_w)  # intermediates, not inputs: kept on ctx
        ctx.mark_non_differentiable(n_tokens)
        return loss_sum, n_tokens

    @staticmethod
    def backward(ctx, d_loss, _d_tokens):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice (retain_graph); its gradients are consumed")
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # the buffers are scaled in place and handed to autograd
        d_loss = d_loss.to(torch.float32).contiguous()
        if grad_h is not None:
            _scale_(grad_h, d_loss)
        if grad_w is not None:
            _scale_(grad_w, d_loss)
        return grad_h, grad_w, None, None


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.linear_cross_entropy`: (loss_sum fp32, n_target_tokens int64)."""
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or labels_N.dim() != 1:
        raise ValueError(
            "linear_cross_entropy: expects hidden [N, D], weight [V, D], labels [N]; got "
            f"{tuple(hidden_ND.shape)}, {tuple(weight_VD.shape)}, {tuple(labels_N.shape)}"
        )
    if hidden_ND.shape[1] != weight_VD.shape[1] or hidden_ND.shape[0] != labels_N.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: shapes disagree: hidden {tuple(hidden_ND.shape)}, "
            f"weight {tuple(weight_VD.shape)}, labels {tuple(labels_N.shape)}"
        )
    labels = labels_N.contiguous()
    device_type = hidden_ND.device.type
    if torch.is_autocast_enabled(device_type):
        # As autocast would run the lm_head matmul: both operands in the autocast dtype
        # (the casts are autograd ops, so an fp32 master weight still gets its gradient).
        dtype = torch.get_autocast_dtype(device_type)
        hidden_ND, weight_VD = hidden_ND.to(dtype), weight_VD.to(dtype)
    if torch.is_grad_enabled() and (hidden_ND.requires_grad or weight_VD.requires_grad):
        return _LinearCrossEntropyFn.apply(hidden_ND, weight_VD, labels, int(ignore_index))
    loss_sum, n_tokens, _, _ = _forward(hidden_ND, weight_VD, labels, int(ignore_index), False, False)
    return loss_sum, n_tokens
