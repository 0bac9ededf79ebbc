"""The shared Llama-family decoder that every strategy trains.

Parameter names match transformers' *ForCausalLM state_dict keys, so checkpoints load
and export without renaming. Every fused op goes through `self.ops` (the PyTorch
reference or Triton, see kernels.dispatch); attention is PyTorch SDPA. Projections go
through `lora.project`: plain linear calls unless the layers carry adapters. Each block
in `model.layers` is a self-contained module so FSDP2 can shard it on its own.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.dispatch import REFERENCE_OPS, Ops
from kernels.models.config import DecoderConfig
from kernels.models.lora import project
from kernels.models.offload import HostOffloader
from kernels.models.rope import rope_cos_sin, rope_parameters


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.head_dim = config.head_dim
        q_out = config.num_attention_heads * config.head_dim
        kv_out = config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x_BTD, cos_BTd, sin_BTd, mask_B1TT, ops: Ops) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTE, k_BTE, v_BTE = project(x_BTD, (self.q_proj, self.k_proj, self.v_proj), ops)
        q_BTHd = q_BTE.view(B, T, -1, self.head_dim)
        k_BTKd = k_BTE.view(B, T, -1, self.head_dim)
        v_BTKd = v_BTE.view(B, T, -1, self.head_dim)
        if self.qk_norm:
            q_BTHd, k_BTKd = self.q_norm(q_BTHd, ops), self.k_norm(k_BTKd, ops)
        q_BTHd, k_BTKd = ops.apply_rope(q_BTHd, k_BTKd, cos_BTd, sin_BTd)
        out_BHTd = F.scaled_dot_product_attention(
            q_BTHd.transpose(1, 2),
            k_BTKd.transpose(1, 2),
            v_BTKd.transpose(1, 2),
            attn_mask=mask_B1TT,
            is_causal=mask_B1TT is None,
            scale=self.head_dim**-0.5,
            enable_gqa=True,
        )
        return project(out_BHTd.transpose(1, 2).reshape(B, T, -1), (self.o_proj,), ops)[0]


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops, output_read: bool = True) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj), ops)
        if type(self.down_proj) is nn.Linear:  # dense: one op, which keeps no activation for backward
            return ops.swiglu_linear(gate, up, self.down_proj.weight, output_read)
        return project(ops.swiglu(gate, up), (self.down_proj,), ops, output_read)[0]  # adapted or 4-bit


class DecoderBlock(nn.Module):
    """Pre-norm block taking and returning the residual stream as (residual, delta).

    The block's input is residual + delta; that add is fused into the input norm
    (ops.add_rms_norm), and the MLP output is handed on unsummed, so every residual
    add in the model runs inside a norm kernel, forward and backward.

    When activation checkpointing recomputes the block (`recompute_contexts`), nothing
    reads the MLP output: its down projection keeps only what backward needs (a dense
    one computes nothing at all: ops.swiglu_linear saves gate, up and the weight).
    """

    def __init__(self, config: DecoderConfig, ops: Ops):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ops = ops
        self.recomputing = False

    def forward(self, residual_BTD, delta_BTD, cos_BTd, sin_BTd, mask_B1TT=None):
        hidden_BTD, normed_BTD = add_then_norm(residual_BTD, delta_BTD, self.input_layernorm, self.ops)
        attn_BTD = self.self_attn(normed_BTD, cos_BTd, sin_BTd, mask_B1TT, self.ops)
        hidden_BTD, normed_BTD = add_then_norm(hidden_BTD, attn_BTD, self.post_attention_layernorm, self.ops)
        return hidden_BTD, self.mlp(normed_BTD, self.ops, output_read=not self.recomputing)

    def recompute_contexts(self):
        """torch.utils.checkpoint's context_fn: (around the forward pass, around its recomputation)."""
        return contextlib.nullcontext(), self._recomputation()

    @contextlib.contextmanager
    def _recomputation(self) -> Iterator[None]:
        self.recomputing = True
        try:
            yield
        finally:
            self.recomputing = False


def add_then_norm(residual, delta, norm: RMSNorm, ops: Ops) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + delta, norm(residual + delta)); delta None means nothing to add."""
    if delta is None:
        return residual, norm(residual, ops)
    return ops.add_rms_norm(residual, delta, norm.weight, norm.eps)


class DecoderModel(nn.Module):
    """Holds what transformers keeps under `model.`: embeddings, blocks, final norm."""

    def __init__(self, config: DecoderConfig, ops: Ops):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderBlock(config, ops) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderLM(nn.Module):
    def __init__(self, config: DecoderConfig, ops: Ops = REFERENCE_OPS):
        super().__init__()
        self.config = config
        self.ops = ops
        self.model = DecoderModel(config, ops)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpointed_blocks = 0  # the first N blocks recompute in backward (set_activation_checkpointing)
        self.offload_checkpoints = False
        inv_freq, self.rope_attention_scaling = rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.init_weights()

    def set_ops(self, ops: Ops) -> None:
        self.ops = ops
        for block in self.model.layers:
            block.ops = ops

    def set_activation_checkpointing(self, mode: str = "full", blocks: int | None = None) -> None:
        """Recompute blocks in backward instead of keeping their activations (training only).

        mode: none | full | offload (full, and each checkpointed block's input waits in
        host memory: kernels/models/offload.py). blocks: how many, from the first; None = all.
        """
        assert mode in ("none", "full", "offload"), mode
        count = len(self.model.layers) if blocks is None else blocks
        assert 0 <= count <= len(self.model.layers), count
        self.checkpointed_blocks = 0 if mode == "none" else count
        self.offload_checkpoints = mode == "offload"

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """transformers' initialisation: N(0, initializer_range) weights, zero biases and pad row, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        padding_idx = self.model.embed_tokens.padding_idx
        if padding_idx is not None:
            self.model.embed_tokens.weight[padding_idx].zero_()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recompute inv_freq in float32 on `device` (default: where it is), e.g. after a meta-device build."""
        inv_freq, _ = rope_parameters(self.config)
        self.inv_freq = inv_freq.to(device or self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # .to(dtype), .bfloat16() (DeepSpeed) and .to_empty() would also cast or blank the
        # RoPE frequencies; recomputing them keeps RoPE exact in float32 on any device.
        super()._apply(fn, recurse)
        self.reset_rope()
        return self

    def hidden_states(self, input_ids, position_ids=None, document_ids=None) -> torch.Tensor:
        """[B, T, D] after the final norm."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if self.inv_freq.is_meta:
            raise RuntimeError("DecoderLM.inv_freq is on the meta device: call reset_rope(device) after loading")
        cos_BTd, sin_BTd = rope_cos_sin(self.inv_freq, position_ids, self.rope_attention_scaling)
        mask_B1TT = attention_mask(T, document_ids, self.config.sliding_window, input_ids.device)
        residual_BTD, delta_BTD = self.model.embed_tokens(input_ids), None
        offloader = HostOffloader(input_ids.device) if self.offload_checkpoints and torch.is_grad_enabled() else None
        for index, block in enumerate(self.model.layers):
            if self.training and index < self.checkpointed_blocks:
                # A checkpoint keeps its inputs: hand it one summed tensor, not two.
                if delta_BTD is not None:
                    residual_BTD, delta_BTD = residual_BTD + delta_BTD, None
                # Under torch.compile the partitioner chooses what to recompute.
                contexts = {} if torch.compiler.is_compiling() else {"context_fn": block.recompute_contexts}
                with offloader.saving(residual_BTD) if offloader else contextlib.nullcontext():
                    residual_BTD, delta_BTD = checkpoint(block, residual_BTD, delta_BTD, cos_BTd, sin_BTd,
                                                         mask_B1TT, use_reentrant=False, **contexts)
            else:
                residual_BTD, delta_BTD = block(residual_BTD, delta_BTD, cos_BTd, sin_BTd, mask_B1TT)
        return add_then_norm(residual_BTD, delta_BTD, self.model.norm, self.ops)[1]

    def forward(self, input_ids, labels, position_ids=None, document_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, number of target tokens); labels are already shifted (-100 = no target)."""
        hidden_BTD = self.hidden_states(input_ids, position_ids, document_ids)
        return self.ops.linear_cross_entropy(
            hidden_BTD.flatten(0, 1), self.lm_head.weight, labels.flatten()
        )

    def logits(self, input_ids, position_ids=None, document_ids=None) -> torch.Tensor:
        """[B, T, V] float32."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, document_ids)).float()


def attention_mask(
    T: int, document_ids_BT: torch.Tensor | None, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B or 1, 1, T, T] (True = attend), or None when plain causal attention suffices.

    Packed sequences attend only within their own document; Mistral's window limits
    how far back a query sees (query - key < window, as transformers counts it).
    """
    windowed = sliding_window is not None and T > sliding_window
    if document_ids_BT is None and not windowed:
        return None
    idx = torch.arange(T, device=device)
    distance_TT = idx[:, None] - idx[None, :]
    mask_TT = distance_TT >= 0
    if windowed:
        mask_TT &= distance_TT < sliding_window
    if document_ids_BT is None:
        return mask_TT[None, None]
    same_doc_BTT = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
    return (mask_TT & same_doc_BTT)[:, None]
