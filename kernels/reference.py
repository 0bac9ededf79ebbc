"""Pure-PyTorch twins of every fused op.

These define what each op computes. The model core calls them through
`kernels.dispatch.Ops`, the Triton versions in `kernels/ops/` must match them
(tests compare outputs and gradients), and they are the CPU fallback.

Layouts: hidden states are [..., D]; q/k for RoPE are [B, T, H, Dh] (the layout the
projections produce, before the transpose for attention); cos/sin are [B, T, Dh].
Labels for the loss are already shifted: labels[i] is the token to predict from
hidden[i], or `ignore_index`. LoRA weights are peft's: A is [r, in], B is [out, r].
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """y = x / rms(x) * (offset + weight); offset=1.0 is the Gemma-style variant.

    The normalisation runs in float32 and the result is cast back before the
    weight multiply, as Hugging Face's Llama does, so bf16 outputs agree bit for bit.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (offset + weight) * normed.to(x.dtype)


def add_rms_norm(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, rms_norm(residual + x)): the pre-norm block's add-then-normalise."""
    summed = residual + x
    return summed, rms_norm(summed, weight, eps, offset)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (the rotate-half convention of Llama/Mistral/Qwen checkpoints).

    q and k may have different head counts (GQA); cos/sin broadcast over heads.
    """
    cos = cos_BTD.unsqueeze(2).to(q_BTHD.dtype)
    sin = sin_BTD.unsqueeze(2).to(q_BTHD.dtype)
    q_out = q_BTHD * cos + _rotate_half(q_BTHD) * sin
    k_out = k_BTHD * cos + _rotate_half(k_BTHD) * sin
    return q_out, k_out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the gated MLP's activation."""
    return F.silu(gate) * up


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, output_read: bool = True) -> torch.Tensor:
    """The gated MLP's down projection, swiglu(gate, up) @ weight^T. output_read=False lets the
    fused op skip work during recomputation; here the output is computed regardless."""
    return F.linear(swiglu(gate, up), weight)


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of target tokens) of lm_head + cross-entropy.

    Returns the sum, not the mean, so the trainer can divide by the target count of
    the whole optimizer step (all micro-batches, all ranks). Logits are upcast to
    float32 before the softmax.
    """
    logits = (hidden_ND @ weight_VD.t()).float()
    loss_sum = F.cross_entropy(logits, labels_N, ignore_index=ignore_index, reduction="sum")
    return loss_sum, (labels_N != ignore_index).sum()


def dense_weight(weight: torch.Tensor, dtype: torch.dtype | None = None, quant_state=None) -> torch.Tensor:
    """A frozen base weight as a dense `dtype` matrix (default: as stored, or for QLoRA's packed
    4-bit storage, dequantized with its bitsandbytes `quant_state`, its compute dtype)."""
    if quant_state is None:
        return weight if dtype is None else weight.to(dtype)
    import bitsandbytes.functional as bnb_functional  # only QLoRA models hold quantised weights

    return bnb_functional.dequantize_4bit(weight.data, quant_state).to(dtype or quant_state.dtype)


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
    """Projections of one input: y_i = x W_i^T + b_i + scaling * dropout(x) A_i^T B_i^T.

    A projection without an adapter has A_i = B_i = None. The base weights are frozen
    (peft trains adapters only); QLoRA's are 4-bit storage with quant_states[i] (None:
    dense). All adapters of the group share one dropout mask, as the fused op does: it
    reads x once for every adapter of the group. outputs_read=False lets the fused op skip
    work during recomputation; autograd saves what each op it runs needs, so here the
    outputs are computed regardless.
    """
    dropped = F.dropout(x, dropout_p, training) if dropout_p else x
    outs = []
    quant_states = quant_states or [None] * len(weights)
    for weight, bias, lora_A, lora_B, quant_state in zip(weights, biases, lora_As, lora_Bs, quant_states):
        y = F.linear(x, dense_weight(weight, x.dtype, quant_state), bias)
        if lora_A is not None:
            y = y + scaling * F.linear(F.linear(dropped, lora_A), lora_B)
        outs.append(y)
    return tuple(outs)
