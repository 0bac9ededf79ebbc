"""LoRA adapters on the decoder's linear layers, named the way peft names them.

`apply_lora(model, spec)` freezes every parameter, then turns each target projection
into a `LoRALinear`: the same frozen `weight` (and `bias`) under the same names, plus
`lora_A` [r, in] and `lora_B` [out, r]. State-dict keys are those of a peft adapter
without its `base_model.model.` prefix (`model.layers.0.self_attn.q_proj.lora_A.weight`),
and the base keys do not change, so checkpoints of the base load as they are.

The decoder computes its projections through `project()`: the projections that share
an input (q/k/v, gate/up) go through one `ops.lora_projections` call, which reads the
input once for all their adapters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from kernels.dispatch import REFERENCE_OPS, Ops
from kernels.reference import dense_weight

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_INITS = ("true", "gaussian")


@dataclass(frozen=True)
class LoraSpec:
    """peft's LoraConfig fields that shape the adapters (bias="none": biases stay frozen)."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    use_rslora: bool = False
    init_lora_weights: str = "true"  # true: A kaiming-uniform, B zeros (peft's default); gaussian: A ~ N(0, 1/r)

    def __post_init__(self) -> None:
        unknown = set(self.target_modules) - set(LORA_TARGETS)
        if unknown or not self.target_modules:
            raise ValueError(f"peft.target_modules={list(self.target_modules)}: choose from {', '.join(LORA_TARGETS)} "
                             f"or all-linear")
        if self.init_lora_weights not in LORA_INITS:
            raise ValueError(f"peft.init_lora_weights={self.init_lora_weights}: choose one of {', '.join(LORA_INITS)}")

    @property
    def scaling(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilised LoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Linear):
    """A frozen linear layer (the original Parameters, not copies) with a trainable low-rank update."""

    def __init__(self, base: nn.Linear, spec: LoraSpec):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, spec.r, bias=False, **factory)
        self.lora_B = nn.Linear(spec.r, base.out_features, bias=False, **factory)
        self.scaling = spec.scaling
        self.lora_dropout = spec.lora_dropout
        self.quant_state = None  # QLoRA: bitsandbytes' QuantState of the 4-bit `weight` (quantize_base_4bit)
        self.reset_lora_parameters(spec.init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str) -> None:
        """peft's initialisation: B = 0, so the adapted model starts as the base model."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, (self,), REFERENCE_OPS)[0]

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B A: the dense weight that computes what base and adapter compute together."""
        base = dense_weight(self.weight, quant_state=self.quant_state)
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (base.float() + self.scaling * delta).to(base.dtype)


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Freezes `model` and adds adapters to every linear layer named in spec.target_modules (in place)."""
    if getattr(model, "lora_spec", None) is not None:
        raise ValueError("the model already has LoRA adapters; build a fresh model to apply others")
    model.requires_grad_(False)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in spec.target_modules and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, spec))
                replaced += 1
    if not replaced:
        raise ValueError(f"peft.target_modules={list(spec.target_modules)}: no such linear layer in the model")
    model.lora_spec = spec
    return model


def project(x: torch.Tensor, layers: Sequence[nn.Linear], ops: Ops, outputs_read: bool = True) -> tuple[torch.Tensor, ...]:
    """The outputs of linear layers that share the input x; their adapters run as one fused op.

    outputs_read=False: a recomputation that keeps only what backward saves (ops.lora_projections).
    """
    lora = [layer for layer in layers if isinstance(layer, LoRALinear)]
    if not lora:
        return tuple(layer(x) for layer in layers)
    first = lora[0]
    return ops.lora_projections(
        x,
        [layer.weight for layer in layers],
        [layer.bias for layer in layers],
        [layer.lora_A.weight if isinstance(layer, LoRALinear) else None for layer in layers],
        [layer.lora_B.weight if isinstance(layer, LoRALinear) else None for layer in layers],
        first.scaling,
        first.lora_dropout,
        first.training,
        [getattr(layer, "quant_state", None) for layer in layers],
        outputs_read,
    )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: layer} of every adapted layer."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


@dataclass(frozen=True)
class QuantSpec:
    """transformers' BitsAndBytesConfig 4-bit fields (QLoRA's frozen base).

    quant_storage is the dtype the packed bytes are viewed as; FSDP2 can shard the storage
    like any parameter when it is the dtype FSDP gathers parameters in (strategies.fsdp).
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    quant_storage: torch.dtype = torch.uint8


class Linear4bit(nn.Module):
    """A frozen linear layer over 4-bit storage that QLoRA left without an adapter."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, quant_state):
        super().__init__()
        self.weight, self.bias, self.quant_state = weight, bias, quant_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, dense_weight(self.weight, x.dtype, self.quant_state), self.bias)


def quant_states(model: nn.Module) -> dict:
    """{parameter name: bitsandbytes QuantState} of every 4-bit weight (empty without QLoRA)."""
    return {f"{name}.weight": module.quant_state for name, module in model.named_modules()
            if getattr(module, "quant_state", None) is not None}


def quantize_base_4bit(model: nn.Module, quant: QuantSpec, device: torch.device | None = None) -> nn.Module:
    """Stores the frozen weights of every block's linear layers in 4 bits (bitsandbytes NF4/FP4).

    Each weight becomes a plain frozen Parameter holding the packed bytes (viewed as
    quant.quant_storage), and its QuantState (absmax, shape, dtype) lives on the module
    (`quant_state`), not on the tensor: a strategy that re-wraps parameters (FSDP2's
    DTensors) keeps it. Adapted layers keep their LoRALinear, whose op dequantises per
    use (reference.dense_weight); the others become `Linear4bit`. Embeddings and the LM
    head stay dense, as in QLoRA. Quantisation happens on `device` (default: where each
    weight is), one weight at a time: a base built on the CPU never has to fit the
    device dense. Everything else stays where it is.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("peft.method=qlora: bitsandbytes is not installed; pip install 'slipstream[qlora]' "
                         "(or bitsandbytes), or use peft=lora") from None
    blocks = model.model.layers
    for parent in list(blocks.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or name.startswith("lora_"):
                continue
            weight = bnb.nn.Params4bit(child.weight.data.to(quant.compute_dtype), requires_grad=False,
                                       quant_type=quant.quant_type, compress_statistics=quant.double_quant,
                                       quant_storage=quant.quant_storage)
            weight = weight.to(device or child.weight.device)  # quantises there
            storage = nn.Parameter(weight.data, requires_grad=False)
            if isinstance(child, LoRALinear):
                child.weight, child.quant_state = storage, weight.quant_state
            else:
                setattr(parent, name, Linear4bit(storage, child.bias, weight.quant_state))
    return model
