"""Exports of a LoRA run: the peft adapter directory, and the base with the adapters merged in.

The adapter directory is what `peft.PeftModel.from_pretrained(base, dir)` loads:
adapter_config.json (written by peft's own LoraConfig) and adapter_model.safetensors
with peft's keys (`base_model.model.` + our state-dict key, adapter name left out).
The merged model is a plain DecoderLM with W + scaling * B A in every adapted layer
(QLoRA bases dequantised), which `kernels.models.save_pretrained` writes as usual.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernels.models.decoder import DecoderLM
from kernels.models.hf_io import _replace_dir
from kernels.models.lora import lora_layers, quant_states
from kernels.reference import dense_weight
from strategies.distributed import plain_core

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def has_adapters(model: torch.nn.Module) -> bool:
    return getattr(model, "lora_spec", None) is not None


def adapter_state(model: DecoderLM) -> dict[str, torch.Tensor]:
    """{peft key: tensor} of every adapter weight, on the CPU."""
    return {f"{PEFT_PREFIX}{name}.{part}.weight": getattr(layer, part).weight.detach().cpu().contiguous()
            for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}


def save_adapter(model: DecoderLM, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Writes the peft adapter directory atomically; returns its path."""
    from peft import LoraConfig

    spec = model.lora_spec
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                   target_modules=sorted(spec.target_modules), use_rslora=spec.use_rslora,
                   init_lora_weights=True if spec.init_lora_weights == "true" else spec.init_lora_weights,
                   bias="none", task_type="CAUSAL_LM",
                   base_model_name_or_path=base_model_name_or_path).save_pretrained(tmp)
        save_file(adapter_state(model), tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@torch.no_grad()
def merged(model: DecoderLM) -> DecoderLM:
    """A plain DecoderLM (CPU, no adapters) computing what `model` computes; `model` is left as it is."""
    dtype = model.model.embed_tokens.weight.dtype
    quantized = quant_states(model)
    state = {name: dense_weight(param, quant_state=quantized.get(name)).to("cpu", dtype, copy=True)
             for name, param in model.named_parameters() if ".lora_" not in name}
    for name, layer in lora_layers(model).items():
        state[f"{name}.weight"] = layer.merged_weight().to("cpu", dtype)
    return plain_core((type(model), model.config, model.ops, None), state)
