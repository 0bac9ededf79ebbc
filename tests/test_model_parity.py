"""DecoderLM against transformers: logits, loss and every gradient, per model family."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers

from kernels.dispatch import REFERENCE_OPS
from kernels.models import DecoderConfig, DecoderLM, load_pretrained
from kernels.models.lora import LoraSpec, apply_lora

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,  # larger than real models so logits and gradients are far from zero
)
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=64,  # with head_dim 16 this puts frequencies in all three bands
)
YARN_ROPE = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)

# name -> (transformers config class, overrides)
FAMILIES = {
    "llama": ("LlamaConfig", dict(pad_token_id=0)),
    "llama_llama3_rope": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=256)),
    "llama_yarn_rope": ("LlamaConfig", dict(rope_parameters=YARN_ROPE, max_position_embeddings=256)),
    "llama_linear_rope": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", factor=2.0))),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "mistral_sliding_window": ("MistralConfig", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=24)),
}
B, T = 2, 11


def tiny_hf_model(family: str, seed: int = 0):
    config_class, overrides = FAMILIES[family]
    config = getattr(transformers, config_class)(**TINY, **overrides, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a swapped norm or a dropped bias
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
    return model.float()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    input_ids[0, 3] = 0  # the pad id of the "llama" family: its embedding row gets no gradient
    labels = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    labels[0, :4] = -100
    labels[1, -3] = -100
    return input_ids, labels


def shift(labels: torch.Tensor) -> torch.Tensor:
    """HF labels (aligned with inputs) -> ours (labels[t] is the target at position t)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def assert_close(name: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-5) -> None:
    diff = (ours - theirs).abs().max().item()
    assert torch.allclose(ours, theirs, rtol=tol, atol=tol), f"{name}: max abs diff {diff:.3e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_loss_and_gradients_match_transformers(family, tmp_path):
    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.model_type == hf.config.model_type
    input_ids, labels = batch()

    hf_logits = hf(input_ids).logits
    ours_logits = ours.logits(input_ids)
    assert_close("logits", ours_logits, hf_logits)

    V = hf_logits.shape[-1]
    hf_loss = F.cross_entropy(hf_logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss_sum, n_tokens = ours(input_ids, shift(labels))
    assert n_tokens.item() == (labels[:, 1:] != -100).sum().item()
    ours_loss = loss_sum / n_tokens
    assert_close("loss", ours_loss, hf_loss)

    hf_loss.backward()
    ours_loss.backward()
    ours_params = dict(ours.named_parameters())
    hf_params = dict(hf.named_parameters())
    assert ours_params.keys() == hf_params.keys()
    for name, p in hf_params.items():
        assert_close(f"grad of {name}", ours_params[name].grad, p.grad)


def tiny_config(**overrides) -> DecoderConfig:
    return DecoderConfig(**{**TINY, **overrides})


def test_packed_documents_match_separate_sequences():
    torch.manual_seed(0)
    model = DecoderLM(tiny_config())
    first, second = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    packed = torch.cat([first, second], dim=1)
    document_ids = torch.tensor([[0] * 5 + [1] * 7])
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]

    packed_logits = model.logits(packed, position_ids=position_ids, document_ids=document_ids)
    assert_close("first document", packed_logits[:, :5], model.logits(first))
    assert_close("second document", packed_logits[:, 5:], model.logits(second))


@pytest.mark.parametrize("mode,blocks", [("full", None), ("full", 1), ("offload", None), ("offload", 1)])
def test_activation_checkpointing_gives_the_same_gradients(mode, blocks):
    torch.manual_seed(0)
    model = DecoderLM(tiny_config())
    input_ids, labels = batch()
    grads = []
    for setting in (("none", None), (mode, blocks)):
        model.zero_grad()
        model.set_activation_checkpointing(*setting)
        loss_sum, _ = model(input_ids, labels)
        loss_sum.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert model.checkpointed_blocks == (blocks or len(model.model.layers))
    for name in grads[0]:
        assert_close(name, grads[1][name], grads[0][name])


def test_every_fused_op_goes_through_set_ops():
    calls = {}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    fields = [f.name for f in dataclasses.fields(REFERENCE_OPS) if f.name != "name"]
    spy = dataclasses.replace(REFERENCE_OPS, **{f: counted(f, getattr(REFERENCE_OPS, f)) for f in fields})
    plain = DecoderLM(tiny_config(model_type="qwen3"))  # dense down projections: ops.swiglu_linear
    adapted = apply_lora(DecoderLM(tiny_config(model_type="qwen3")), LoraSpec(r=2))  # ops.lora_projections, ops.swiglu
    for model in (plain, adapted):
        model.set_ops(spy)
        model(*batch())
    assert set(calls) == set(fields)
    assert calls["apply_rope"] == 2 * TINY["num_hidden_layers"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(model_type="gpt2"), "model_type"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_size=66), "hidden_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(pad_token_id=97), "pad_token_id"),
        (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "longrope"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        (dict(model_type="mistral", attention_bias=True), "attention_bias"),
        (dict(model_type="llama", qk_norm=True), "qk_norm"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize("family", ["llama_tied", "qwen2", "qwen3"])
def test_num_parameters_counts_the_module(family):
    config_class, overrides = FAMILIES[family]
    hf_config = getattr(transformers, config_class)(**TINY, **overrides)
    config = DecoderConfig.from_hf_dict(hf_config.to_dict())
    with torch.device("meta"):
        model = DecoderLM(config)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_rope_frequencies_survive_casts_and_to_empty():
    model = DecoderLM(tiny_config(rope_scaling=dict(rope_type="linear", factor=2.0)))
    exact = model.inv_freq.clone()
    assert model.to(torch.bfloat16).inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, exact)
    with torch.device("meta"):
        meta_model = DecoderLM(model.config)
    assert torch.equal(meta_model.to_empty(device="cpu").inv_freq, exact)
    assert "inv_freq" not in "".join(model.state_dict())
