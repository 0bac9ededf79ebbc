"""Hugging Face directories: our exports load in transformers and back, and bad inputs fail clearly."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from kernels.models import DecoderConfig, DecoderLM, load_config, load_pretrained, save_pretrained
from kernels.models.config import ARCHITECTURES
from test_model_parity import TINY as PARITY_TINY

TINY = dict(PARITY_TINY, bos_token_id=1, eos_token_id=2)  # the same tiny shapes, with special tokens
CONFIGS = {
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
    "llama3_rope": dict(
        model_type="llama",
        rope_theta=500000.0,
        max_position_embeddings=256,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ),
    "mistral": dict(model_type="mistral", sliding_window=4),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=24, attention_bias=True),
}


def tiny_model(name: str, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(DecoderConfig(**TINY, **CONFIGS[name]))
    with torch.no_grad():  # give norms and biases values a loader could get wrong
        for param_name, p in model.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (ours - theirs).abs().max().item()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), f"max abs diff {diff:.3e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_transformers_and_back(name, tmp_path):
    model = tiny_model(name)
    save_pretrained(model, tmp_path / "export")

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", attn_implementation="sdpa", output_loading_info=True
    )
    assert type(hf).__name__ == ARCHITECTURES[model.config.model_type]
    assert not any(info.values()), info
    x = input_ids()
    assert_close(model.logits(x), hf(x).logits)

    reloaded = load_pretrained(tmp_path / "export")
    assert reloaded.config == model.config
    assert torch.equal(reloaded.logits(x), model.logits(x))
    if model.config.tie_word_embeddings:
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_transformers(name, tmp_path):
    config = DecoderConfig(**TINY, **CONFIGS[name])
    tmp_path.joinpath("config.json").write_text(json.dumps(config.to_hf_dict()))
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf_config).__name__ == ARCHITECTURES[config.model_type].replace("ForCausalLM", "Config")
    assert DecoderConfig.from_hf_dict(hf_config.to_dict()) == config


def test_reads_a_transformers_4_config():
    v4 = {  # Llama 3.1's config.json as transformers 4.x writes it
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    }
    config = DecoderConfig.from_hf_dict(v4)
    assert config.rope_theta == 500000.0 and config.rope_type == "llama3"
    assert config.rope_scaling["original_max_position_embeddings"] == 8192
    assert config.eos_token_id == [128001, 128008, 128009]
    assert DecoderConfig.from_hf_dict(config.to_hf_dict()) == config


def test_small_shards_write_an_index(tmp_path):
    model = tiny_model("qwen3")
    save_pretrained(model, tmp_path / "export", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "export" / "model.safetensors").exists()
    assert {p.name for p in (tmp_path / "export").glob("*.safetensors")} == shards

    x = input_ids()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="sdpa")
    assert_close(model.logits(x), hf(x).logits)
    assert torch.equal(load_pretrained(tmp_path / "export").logits(x), model.logits(x))


def test_dtype_and_overwrite(tmp_path):
    export = tmp_path / "export"
    save_pretrained(tiny_model("qwen2", seed=0), export)
    model = tiny_model("qwen2", seed=1)
    save_pretrained(model, export, dtype=torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or old directories left
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load_pretrained(export, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in reloaded.parameters())
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"model.path={tmp_path / 'nope'}"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_config(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    save_pretrained(tiny_model("llama_tied"), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys: \['model.layers.1.mlp.up_proj.weight'\]") as error:
        load_pretrained(tmp_path)
    assert "model.layers.1.mlp.extra.weight" in str(error.value)
