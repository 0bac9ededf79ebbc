"""Model FLOPs per token and the device's peak, for MFU (model FLOPs utilisation).

FLOPs per trained token (the PaLM / Megatron convention, causal attention not halved):

    6 * N_trainable + 4 * N_frozen + 12 * L * (n_heads * head_dim) * T

- N: the matrices that multiply activations: every linear layer's weight, the LM
  head included (also when it is tied to the embedding), the embedding lookup and
  vectors (norms, biases) left out. A trainable weight costs 2 FLOPs per token
  forward, 2 for the input gradient and 2 for its own gradient (6N); a frozen one
  (LoRA's base weights) has no weight gradient (4N). LoRA's small A/B matrices are
  trainable weights like any other.
- 12 * L * d_attn * T: the attention scores and the weighted sum, forward and
  backward, over a context of T = trainer.seq_len.

MFU = FLOPs per token x tokens/s per device / the device's dense bf16 peak. Activation
checkpointing's recomputation is not counted (that would be hardware FLOPs utilisation).
"""
from __future__ import annotations

import torch
from torch import nn

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s with fp32 accumulation, from
# NVIDIA's data sheets. First match on the device name wins: more specific names first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
    ("T4", 65.0),  # fp16 only; no bf16
)


def peak_tflops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name, or None for devices it does not know."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def device_peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """FLOP/s of one device (logger.peak_tflops when set); None on the CPU or an unknown GPU: no MFU."""
    if device.type != "cuda":
        return None
    tflops = override_tflops or peak_tflops(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None


def matmul_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) elements of the weights that multiply activations (see the module docstring)."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    trainable = frozen = 0
    for param in model.parameters():  # tied weights once
        if param.ndim < 2 or (id(param) in embedding and id(param) not in linear):
            continue
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return trainable, frozen


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of `model` (the unwrapped core, before sharding) at context `seq_len`."""
    trainable, frozen = matmul_parameters(model)
    config = model.config
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * trainable + 4 * frozen + attention
