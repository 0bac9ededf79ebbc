"""The model core for a `model` config: loaded from a Hugging Face directory or random-init, with `peft` adapters."""
from __future__ import annotations

import dataclasses

import torch

from kernels.dispatch import resolve_ops
from kernels.models import DecoderConfig, DecoderLM, load_pretrained
from kernels.models.lora import LoraSpec, QuantSpec, apply_lora, quantize_base_4bit
from launcher.config import ModelConfig, PeftConfig

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
                seed: int, peft: PeftConfig | None = None) -> DecoderLM:
    ops = resolve_ops(cfg.kernels, device)
    if cfg.path:
        model = load_pretrained(cfg.path, device=device, dtype=dtype, ops=ops)
    else:
        torch.manual_seed(seed)
        model = DecoderLM(architecture(cfg, tokenizer_vocab_size), ops=ops).to(device=device, dtype=dtype)
    return add_adapters(model, peft) if peft is not None and peft.method != "none" else model


def add_adapters(model: DecoderLM, peft: PeftConfig) -> DecoderLM:
    """peft=lora: frozen base + LoRA adapters; peft=qlora: the same over a 4-bit base."""
    apply_lora(model, LoraSpec(r=peft.r, lora_alpha=peft.lora_alpha, lora_dropout=peft.lora_dropout,
                               target_modules=tuple(peft.target_modules), use_rslora=peft.use_rslora,
                               init_lora_weights=peft.init_lora_weights))
    if peft.method == "qlora":
        quantize_base_4bit(model, QuantSpec(peft.bnb_4bit_quant_type, peft.bnb_4bit_use_double_quant,
                                            getattr(torch, peft.bnb_4bit_compute_dtype),
                                            getattr(torch, peft.bnb_4bit_quant_storage)))
    return model
