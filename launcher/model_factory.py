"""The model core for a `model` config: loaded from a Hugging Face directory or random-init."""
from __future__ import annotations

import dataclasses

import torch

from kernels.dispatch import resolve_ops
from kernels.models import DecoderConfig, DecoderLM, load_pretrained
from launcher.config import ModelConfig

# ModelConfig fields that are not architecture.
_NOT_ARCHITECTURE = {"name", "path", "tokenizer", "kernels"}


def architecture(cfg: ModelConfig, tokenizer_vocab_size: int) -> DecoderConfig:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_ARCHITECTURE}
    fields["vocab_size"] = cfg.vocab_size or tokenizer_vocab_size
    if fields["vocab_size"] < tokenizer_vocab_size:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer_vocab_size} tokens; set it to 0 to use the tokenizer's size")
    return DecoderConfig(**fields)


def build_model(cfg: ModelConfig, tokenizer_vocab_size: int, device: torch.device, dtype: torch.dtype,
                seed: int) -> DecoderLM:
    ops = resolve_ops(cfg.kernels, device)
    if cfg.path:
        return load_pretrained(cfg.path, device=device, dtype=dtype, ops=ops)
    torch.manual_seed(seed)
    model = DecoderLM(architecture(cfg, tokenizer_vocab_size), ops=ops)
    return model.to(device=device, dtype=dtype)
