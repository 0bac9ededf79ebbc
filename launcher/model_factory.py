"""The model core for a `model` config: loaded from a Hugging Face directory or random-init, with `peft` adapters."""
from __future__ import annotations

import dataclasses

import torch

from kernels.dispatch import resolve_ops
from kernels.models import DecoderConfig, DecoderLM, load_config, load_pretrained
from kernels.models.lora import LoraSpec, QuantSpec, apply_lora, quantize_base_4bit
from launcher.config import Config, ModelConfig, PeftConfig
from launcher.precision import Precision

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
    adapters = peft is not None and peft.method != "none"
    # QLoRA's base reaches the device quantised, one weight at a time (quantize_base_4bit): a
    # 12 GiB card then trains an 8B model whose dense copy (16 GB) it could never hold.
    staging = torch.device("cpu") if adapters and peft.method == "qlora" else device
    if cfg.path:
        model = load_pretrained(cfg.path, device=staging, dtype=dtype, ops=ops)
    else:
        torch.manual_seed(seed)
        model = DecoderLM(architecture(cfg, tokenizer_vocab_size), ops=ops).to(device=staging, dtype=dtype)
    return add_adapters(model, peft, device).to(device) if adapters else model


def resolved_peft(peft: PeftConfig, precision: Precision) -> PeftConfig:
    """peft with bnb_4bit_quant_storage=auto made concrete: the dtype sharded parameters are gathered in."""
    if peft.method != "qlora" or peft.bnb_4bit_quant_storage != "auto":
        return peft
    return dataclasses.replace(peft, bnb_4bit_quant_storage=str(precision.shard_dtype).removeprefix("torch."))


def add_adapters(model: DecoderLM, peft: PeftConfig, device: torch.device | None = None) -> DecoderLM:
    """peft=lora: frozen base + LoRA adapters; peft=qlora: the same over a 4-bit base, quantised into
    `device` (default: where the weights are)."""
    apply_lora(model, LoraSpec(r=peft.r, lora_alpha=peft.lora_alpha, lora_dropout=peft.lora_dropout,
                               target_modules=tuple(peft.target_modules), use_rslora=peft.use_rslora,
                               init_lora_weights=peft.init_lora_weights))
    if peft.method == "qlora":
        assert peft.bnb_4bit_quant_storage != "auto", "resolved_peft() makes the storage dtype concrete first"
        quantize_base_4bit(model, QuantSpec(peft.bnb_4bit_quant_type, peft.bnb_4bit_use_double_quant,
                                            getattr(torch, peft.bnb_4bit_compute_dtype),
                                            getattr(torch, peft.bnb_4bit_quant_storage)), device)
    return model


def build_meta_model(cfg: Config, tokenizer_vocab_size: int | None = None) -> DecoderLM:
    """The model core with its adapters on the meta device: shapes and counts without memory.

    For peft=qlora the adapters only: a 4-bit base cannot live on the meta device (the dry
    run counts its bytes itself). The tokenizer is loaded only when its size is needed
    and not given.
    """
    if cfg.model.path:
        config = load_config(cfg.model.path)
    else:
        if tokenizer_vocab_size is None and not cfg.model.vocab_size:
            from launcher.data import load_tokenizer

            tokenizer_vocab_size = len(load_tokenizer(cfg.model.path, cfg.model.tokenizer))
        config = architecture(cfg.model, tokenizer_vocab_size or 0)
    with torch.device("meta"):
        model = DecoderLM(config)
        if cfg.peft.method != "none":
            add_adapters(model, dataclasses.replace(cfg.peft, method="lora"))
    return model
