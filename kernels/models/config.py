"""The decoder's architecture, and its translation to and from Hugging Face config.json.

One dataclass covers the Llama family as transformers defines it: Llama, Mistral,
Qwen2/2.5 (bias on q/k/v) and Qwen3 (RMSNorm on each q/k head). A family's fixed
traits switch on by themselves: qwen2 implies attention_bias, qwen3 implies qk_norm.
"""
from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
MODEL_TYPES = tuple(ARCHITECTURES)
MODEL_TYPE_OF = {arch: model_type for model_type, arch in ARCHITECTURES.items()}
# What transformers' config classes assume when config.json leaves a key out.
HF_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "qwen3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": 128},
}

# Keys each rope_type needs in rope_scaling (original_max_position_embeddings
# defaults to max_position_embeddings, as transformers does).
ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
ROPE_TYPES = tuple(ROPE_REQUIRED_KEYS)


@dataclass
class DecoderConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (and o_proj for llama/qwen3); always on for qwen2
    qk_norm: bool = False  # RMSNorm over each q/k head before RoPE; always on for qwen3
    sliding_window: int | None = None  # Mistral v0.1's windowed attention; None attends to the whole prefix
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: choose one of {', '.join(MODEL_TYPES)}")
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be a positive integer")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}: change one of them or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}: must be a positive even number (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads} (grouped-query attention): pick a divisor"
            )
        self.attention_bias = self.attention_bias or self.model_type == "qwen2"
        self.qk_norm = self.qk_norm or self.model_type == "qwen3"
        if self.attention_bias and self.model_type == "mistral":
            raise ValueError("attention_bias=true: mistral has no attention biases; use model_type=llama or qwen3")
        if self.qk_norm and self.model_type != "qwen3":
            raise ValueError(f"qk_norm=true: model_type={self.model_type} has no q/k norm; use model_type=qwen3")
        if self.sliding_window is not None and (self.model_type != "mistral" or self.sliding_window <= 0):
            raise ValueError(
                f"sliding_window={self.sliding_window}: only a positive window on model_type=mistral is supported; "
                "set it to null"
            )
        if self.pad_token_id is not None and not -self.vocab_size <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is outside the vocabulary (vocab_size={self.vocab_size})")
        self.rope_scaling = _normalised_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @property
    def o_proj_bias(self) -> bool:
        """Llama and Qwen3 put `attention_bias` on o_proj as well; Qwen2 biases q/k/v only."""
        return self.attention_bias and self.model_type != "qwen2"

    @classmethod
    def from_hf_dict(cls, d: dict) -> DecoderConfig:
        """Reads a config.json written by transformers 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters)."""
        architectures = d.get("architectures") or []
        unknown = [a for a in architectures if a not in ARCHITECTURES.values()]
        if unknown:
            raise ValueError(f"architectures={unknown}: supported are {', '.join(ARCHITECTURES.values())}")
        model_type = d.get("model_type") or (MODEL_TYPE_OF[architectures[0]] if architectures else "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r}: supported are {', '.join(MODEL_TYPES)}")
        d = {**HF_DEFAULTS[model_type], **d}
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r}: only silu (SwiGLU) is supported")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=true: MLP biases are not supported")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true: per-layer sliding windows (Qwen) are not supported")

        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial_rotary_factor={rope['partial_rotary_factor']}: partial RoPE is not supported")
        rope.pop("partial_rotary_factor", None)

        optional = {
            "head_dim": d.get("head_dim"),
            "rms_norm_eps": d.get("rms_norm_eps"),
            "max_position_embeddings": d.get("max_position_embeddings"),
            "tie_word_embeddings": d.get("tie_word_embeddings", False),
            "attention_bias": d.get("attention_bias") if model_type in ("llama", "qwen3") else None,
            "sliding_window": d.get("sliding_window") if model_type == "mistral" else None,
            "initializer_range": d.get("initializer_range"),
        }
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            rope_theta=float(rope_theta),
            rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            **{k: v for k, v in optional.items() if v is not None},
        )

    def to_hf_dict(self) -> dict:
        """config.json as transformers 5.17 writes it for this family (AutoConfig picks the right class)."""
        rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        d = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "use_cache": True,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope_parameters,
            # transformers 4.x and the tools pinned to it read these two instead of rope_parameters
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=False, pretraining_tp=1)
        elif self.model_type == "mistral":
            d.update(sliding_window=self.sliding_window)
        else:
            d.update(
                use_sliding_window=False,
                sliding_window=None,
                max_window_layers=self.num_hidden_layers,
                layer_types=["full_attention"] * self.num_hidden_layers,
            )
            if self.model_type == "qwen3":
                d.update(attention_bias=self.attention_bias)
        return d

    def num_parameters(self) -> int:
        d, dh, v = self.hidden_size, self.head_dim, self.vocab_size
        q_out, kv_out = self.num_attention_heads * dh, self.num_key_value_heads * dh
        attention = d * (q_out + 2 * kv_out) + q_out * d
        attention += (q_out + 2 * kv_out) * self.attention_bias + d * self.o_proj_bias + 2 * dh * self.qk_norm
        layer = attention + 3 * d * self.intermediate_size + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + d


def _normalised_rope_scaling(rope_scaling: dict | None, max_position_embeddings: int) -> dict | None:
    if not rope_scaling:
        return None
    scaling = dict(rope_scaling)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={rope_type!r}: supported are {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return None
    if rope_type in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [k for k in ROPE_REQUIRED_KEYS[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling (rope_type={rope_type}) lacks {', '.join(missing)}: add them")
    return {"rope_type": rope_type, **scaling}
