"""LoRA: the fused projections op vs its twin, adapters on the model core, training, peft export, QLoRA.

The op is compared with `reference.lora_projections` in outputs and the gradients of x,
A and B (float32 on CPU, where the dropout kernel runs in Triton's interpreter; float32
and bfloat16 on CUDA). Export round trips go through peft and transformers themselves.

This file is also a distributed worker: `torchrun ... tests/test_lora.py '<json spec>'`.
"""
from __future__ import annotations

import collections

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import reference
from kernels.models import DecoderConfig, DecoderLM, save_pretrained
from kernels.models.lora import LoraSpec, LoRALinear, QuantSpec, apply_lora, lora_layers, quantize_base_4bit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _group(in_dim, out_dims, adapted, rank, dtype, bias=False, seed=0):
    """(x, weights, biases, As, Bs) of one projection group; projections not in `adapted` have no adapter."""
    x = _randn(3, 5, in_dim, dtype=dtype, seed=seed)
    weights = [_randn(out, in_dim, dtype=dtype, seed=seed + 1 + i, scale=in_dim**-0.5)
               for i, out in enumerate(out_dims)]
    biases = [_randn(out, dtype=dtype, seed=seed + 10 + i) if bias else None for i, out in enumerate(out_dims)]
    As = [_randn(rank, in_dim, dtype=dtype, seed=seed + 20 + i, scale=in_dim**-0.5) if i in adapted else None
          for i in range(len(out_dims))]
    Bs = [_randn(out, rank, dtype=dtype, seed=seed + 30 + i, scale=rank**-0.5) if i in adapted else None
          for i, out in enumerate(out_dims)]
    return x, weights, biases, As, Bs


def _run(fn, group, scaling, dropout_p=0.0, seed=0):
    """Outputs and (dx, dA..., dB...) of fn on fresh leaves; torch seeded first (the dropout mask)."""
    x, weights, biases, As, Bs = group
    x = x.clone().requires_grad_()
    As = [None if a is None else a.clone().requires_grad_() for a in As]
    Bs = [None if b is None else b.clone().requires_grad_() for b in Bs]
    torch.manual_seed(seed)
    outs = fn(x, weights, biases, As, Bs, scaling, dropout_p, True)
    upstream = [_randn(*o.shape, dtype=o.dtype, seed=40 + i) for i, o in enumerate(outs)]
    sum((o.float() * u.float()).sum() for o, u in zip(outs, upstream)).backward()
    grads = [x.grad] + [t.grad for t in (*As, *Bs) if t is not None]
    return [o.detach() for o in outs], grads


def _assert_all_close(actual, expected, dtype):
    assert len(actual) == len(expected)
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a.float(), b.float(), **TOLERANCE[dtype], msg=lambda m: f"tensor {i}: {m}")


def _assert_no_worse_than_reference(actual, reference_low, truth):
    """Low precision: the op's error against the fp32 truth is at most twice the reference twin's own.

    Elementwise bounds fail on bf16 gradients that are sums with cancellation (seen on the
    H100: 1-2 elements of dA 0.03-0.05 off where both sides round differently); the error
    norm against the truth says whether the op rounds worse than PyTorch itself.
    """
    for i, (a, r, t) in enumerate(zip(actual, reference_low, truth)):
        assert a.shape == t.shape, (i, a.shape, t.shape)
        op_error, reference_error = (a.float() - t).norm(), (r.float() - t).norm()
        assert op_error <= 2 * reference_error + 1e-3 * t.norm(), (i, float(op_error), float(reference_error))


def _fp32_truth(group, scaling):
    """The reference twin on the same values in fp32: what both low-precision results approximate."""
    upcast = [[None if t is None else t.float() for t in part] if isinstance(part, list) else part.float()
              for part in group]
    return _run(reference.lora_projections, upcast, scaling=scaling)


# ------------------------------------------------------------------------------------ the op

GROUPS = {  # (in, outs, adapted projections, rank, bias)
    "o_proj-alone": (24, [17], [0], 3, False),
    "qkv-grouped": (20, [16, 8, 8], [0, 1, 2], 4, False),
    "qkv-q-and-v-only-bias": (20, [16, 8, 8], [0, 2], 2, True),
    "gate_up-grouped": (13, [29, 29], [0, 1], 5, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GROUPS))
def test_lora_projections_match_reference(case, dtype):
    pytest.importorskip("triton")
    from kernels import ops

    in_dim, outs, adapted, rank, bias = GROUPS[case]
    group = _group(in_dim, outs, adapted, rank, dtype, bias)
    out, grads = _run(ops.lora_projections, group, scaling=0.7)
    ref_out, ref_grads = _run(reference.lora_projections, group, scaling=0.7)
    if dtype == torch.float32:
        _assert_all_close(out, ref_out, dtype)
        _assert_all_close(grads, ref_grads, dtype)
    else:
        true_out, true_grads = _fp32_truth(group, scaling=0.7)
        _assert_no_worse_than_reference(out + grads, ref_out + ref_grads, true_out + true_grads)


def test_lora_projections_refuse_a_trainable_base():
    pytest.importorskip("triton")
    from kernels import ops

    x, weights, biases, As, Bs = _group(8, [4], [0], 2, torch.float32)
    with pytest.raises(ValueError, match="must be frozen"):
        ops.lora_projections(x, [weights[0].requires_grad_()], biases, As, Bs, 1.0)


def _dropout_reference(p):
    """The twin with the op's own mask: what the fused dropout must compute."""
    from kernels.ops import lora as lora_op

    def fn(x, weights, biases, As, Bs, scaling, dropout_p, training):
        seed = int(torch.randint(0, 2**31 - 1, ()))  # the op draws its seed the same way
        keep = lora_op.dropout(torch.ones_like(x).reshape(-1, x.shape[-1]), seed, p).view_as(x)
        outs = reference.lora_projections(x, weights, biases, [None] * len(As), [None] * len(Bs), scaling)
        dropped = x * keep
        return tuple(y if a is None else y + scaling * dropped @ a.t() @ b.t() for y, a, b in zip(outs, As, Bs))

    return fn


def test_dropout_is_the_masked_reference_and_reproducible_under_a_seed():
    pytest.importorskip("triton")
    from kernels import ops

    p = 0.3
    group = _group(20, [16, 8, 8], [0, 1, 2], 4, torch.float32)
    out, grads = _run(ops.lora_projections, group, 0.5, dropout_p=p, seed=7)
    _assert_all_close(out, _run(_dropout_reference(p), group, 0.5, dropout_p=p, seed=7)[0], torch.float32)
    _assert_all_close(grads, _run(_dropout_reference(p), group, 0.5, dropout_p=p, seed=7)[1], torch.float32)
    again_out, again_grads = _run(ops.lora_projections, group, 0.5, dropout_p=p, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(out + grads, again_out + again_grads))
    other_out, _ = _run(ops.lora_projections, group, 0.5, dropout_p=p, seed=8)
    assert not torch.equal(out[0], other_out[0])
    from kernels.ops import lora as lora_op

    kept = (lora_op.dropout(torch.ones(8, 512, device=DEVICE), 123, p) != 0).float().mean()
    assert abs(float(kept) - (1 - p)) < 0.05


# ------------------------------------------------------------------------------- the model core

def _trainable_grads(model: DecoderLM, ids: torch.Tensor, seed: int | None = None) -> dict[str, torch.Tensor]:
    """The adapters' gradients of the mean token loss on `ids` (torch seeded first: the dropout mask)."""
    model.to(DEVICE).train()
    if seed is not None:
        torch.manual_seed(seed)
    loss_sum, n = model(ids.to(DEVICE), ids.to(DEVICE))
    (loss_sum / n).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def _tiny_lora_model(spec: LoraSpec, seed=0) -> DecoderLM:
    torch.manual_seed(seed)
    return apply_lora(DecoderLM(DecoderConfig(**TINY)), spec)


def test_apply_lora_freezes_the_base_and_names_adapters_like_peft():
    model = _tiny_lora_model(LoraSpec(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"model.layers.{i}.{m}.{part}.weight" for i in range(2)
                               for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
                               for part in ("lora_A", "lora_B"))
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # the base keeps its keys
    assert not any(isinstance(m, LoRALinear) for m in (model.model.layers[0].self_attn.k_proj, model.lm_head))
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and layer.scaling == 2.0
    bound = 1 / math.sqrt(32)  # kaiming-uniform with a=sqrt(5), as peft (and nn.Linear) initialise A
    assert 0.5 * bound < layer.lora_A.weight.abs().max() <= bound


def test_fresh_adapters_leave_the_model_unchanged_and_train_alone():
    torch.manual_seed(0)
    base = DecoderLM(DecoderConfig(**TINY))
    model = apply_lora(DecoderLM(DecoderConfig(**TINY)), LoraSpec(r=4))
    model.load_state_dict(base.state_dict(), strict=False)
    ids = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(model.logits(ids), base.logits(ids))
    loss_sum, n = model(ids, ids)
    (loss_sum / n).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (".lora_" in name), name
    assert all(layer.lora_A.weight.grad.abs().sum() == 0 for layer in lora_layers(model).values())  # B = 0
    assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in lora_layers(model).values())


def test_model_on_the_fused_op_matches_the_reference_model():
    import copy

    pytest.importorskip("triton")
    from kernels.dispatch import resolve_ops

    reference_model = _tiny_lora_model(LoraSpec(r=4, use_rslora=True))
    with torch.no_grad():
        for layer in lora_layers(reference_model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    fused = copy.deepcopy(reference_model)
    fused.set_ops(resolve_ops("triton", torch.device(DEVICE)))
    ids = torch.randint(0, 61, (2, 9))
    grads = [_trainable_grads(model, ids) for model in (reference_model, fused)]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_mask_survives_activation_checkpointing():
    """Recomputing a block draws the same dropout seed (checkpoint restores the RNG), so gradients agree."""
    import copy

    pytest.importorskip("triton")
    from kernels.dispatch import resolve_ops

    plain = _tiny_lora_model(LoraSpec(r=4, lora_dropout=0.25, target_modules=("q_proj", "up_proj")))
    plain.set_ops(resolve_ops("triton", torch.device(DEVICE)))
    with torch.no_grad():
        for layer in lora_layers(plain).values():
            layer.lora_B.weight.normal_(0, 0.1)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_activation_checkpointing("full")
    ids = torch.randint(0, 61, (1, 6))  # few rows: few interpreted programs
    grads = [_trainable_grads(model, ids, seed=3) for model in (plain, checkpointed)]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["full", "offload"])
def test_recomputation_skips_the_down_projection_it_never_reads(mode, monkeypatch):
    """A recomputed block runs every base projection but the MLP's last (its output goes nowhere),
    and the adapters' gradients are those of the run that kept its activations."""
    import copy

    pytest.importorskip("triton")
    from kernels.dispatch import resolve_ops
    from kernels.ops import lora as lora_op

    kept = _tiny_lora_model(LoraSpec(r=4))
    kept.set_ops(resolve_ops("triton", torch.device(DEVICE)))
    with torch.no_grad():
        for layer in lora_layers(kept).values():
            layer.lora_B.weight.normal_(0, 0.1)
    recomputed = copy.deepcopy(kept)
    recomputed.set_activation_checkpointing(mode)
    names = {id(weight): name for name, weight in kept.named_parameters()}
    names.update({id(weight): name for name, weight in recomputed.named_parameters()})
    base_weights_read = []
    monkeypatch.setattr(lora_op, "dense_weight", lambda weight, *args: base_weights_read.append(names[id(weight)]) or weight)
    ids = torch.randint(0, 61, (1, 6))
    grads, reads = [], []
    for model in (kept, recomputed):
        base_weights_read.clear()
        grads.append(_trainable_grads(model, ids))
        reads.append(collections.Counter(name.split(".")[-2] for name in base_weights_read))
    blocks = kept.config.num_hidden_layers
    recomputation = {name: blocks for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")}
    assert reads[1] - reads[0] == recomputation  # every base projection but down_proj, once a block
    for name, grad in grads[0].items():  # on CUDA the attention backward adds in any order: not bitwise
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bad_lora_config_names_the_key():
    from launcher.compose import ConfigError, validate

    for overrides, expected in ((["peft=lora", "peft.target_modules=[q_proj,lm_head]"], "peft.target_modules"),
                                (["peft=lora", "peft.r=0"], "peft.r: must be > 0"),
                                (["peft=lora", "peft.init_lora_weights=pissa"], "peft.init_lora_weights"),
                                (["peft=lora", "peft.lora_dropout=1.0"], "peft.lora_dropout"),
                                (["peft=qlora", "peft.bnb_4bit_quant_storage=int4"], "peft.bnb_4bit_quant_storage")):
        with pytest.raises(ConfigError, match=expected):
            validate(overrides, multirun=False)
    for strategy in ("fsdp", "hsdp", "zero2", "zero3"):  # QLoRA under every strategy
        validate(["peft=qlora", f"strategy={strategy}", "cluster.nproc_per_node=2"], multirun=False)


def test_a_4bit_storage_the_strategy_would_cast_is_refused_by_name():
    """FSDP2 and DeepSpeed cast floating parameters; packed 4-bit bytes of another float dtype would be scrambled."""
    if not _bitsandbytes_4bit_works():
        pytest.skip(f"bitsandbytes 4-bit does not run on {DEVICE} here")
    from functools import partial

    from strategies.distributed import refuse_4bit_storage_cast

    # as strategies.fsdp and strategies.zero call it
    check_fsdp = partial(refuse_4bit_storage_cast, caster="FSDP2 gathers parameters in", bytes_survive=False)
    check_zero = partial(refuse_4bit_storage_cast, caster="DeepSpeed casts floating parameters to", bytes_survive=True)

    model = DecoderLM(DecoderConfig(**TINY))
    apply_lora(model, LoraSpec(r=4))
    quantize_base_4bit(model, QuantSpec(compute_dtype=torch.float32, quant_storage=torch.float32))
    check_fsdp(model, torch.float32)
    check_zero(model, None)
    with pytest.raises(ValueError, match=r"peft.bnb_4bit_quant_storage=float32: FSDP2 gathers parameters in bfloat16"):
        check_fsdp(model, torch.bfloat16)
    with pytest.raises(ValueError, match=r"peft.bnb_4bit_quant_storage=float32: DeepSpeed casts .* to float16"):
        check_zero(model, torch.float16)
    packed_bytes = quantize_base_4bit(apply_lora(DecoderLM(DecoderConfig(**TINY)), LoraSpec(r=4)), QuantSpec())
    check_zero(packed_bytes, torch.float16)  # uint8 is not a floating dtype: DeepSpeed leaves it alone


# ------------------------------------------------------------------------------- export

def _peft_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(hf, adapter_dir).eval()(ids).logits.float()


def _hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(ids).logits.float()


def test_adapter_loads_in_peft_and_merged_export_in_transformers(tmp_path):
    from launcher.peft_export import merged, save_adapter

    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(**TINY)).eval()
    save_pretrained(model, tmp_path / "base")
    apply_lora(model, LoraSpec(r=4, lora_alpha=6, target_modules=("q_proj", "v_proj", "o_proj", "up_proj"),
                               use_rslora=True))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.2)
    save_adapter(model, tmp_path / "adapter")
    save_pretrained(merged(model), tmp_path / "merged")
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        ours = model.logits(ids)
    assert (ours - _hf_logits(tmp_path / "base", ids)).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(_peft_logits(tmp_path / "base", tmp_path / "adapter", ids), ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_hf_logits(tmp_path / "merged", ids), ours, rtol=1e-4, atol=1e-4)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 6, True)


# ------------------------------------------------------------------------------- training

SHORT_LORA = ["peft=lora", "peft.r=8", "peft.lora_alpha=16", "trainer.max_steps=20", "trainer.log_every=1",
              "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "optim.lr=1e-2", "optim.warmup_steps=0",
              "data.max_eval_examples=8", "data.eval_exact_match=false", "logger.progress_bar=false"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from launcher.compose import compose_config, to_config
    from launcher.loop import train

    run_dir = tmp_path_factory.mktemp("lora-run")
    config = to_config(compose_config(SHORT_LORA))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only fight over the shared cores
    try:
        return run_dir, config, train(config, run_dir)
    finally:
        torch.set_num_threads(threads)


def test_lora_training_lowers_the_loss_and_changes_only_adapters(lora_run):
    from kernels.models import load_pretrained
    from launcher.data import load_tokenizer
    from launcher.model_factory import build_model

    run_dir, config, summary = lora_run
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and max(losses[-5:]) < losses[0] - 0.3, losses
    base = build_model(config.model, len(load_tokenizer(None, None)), torch.device("cpu"), torch.float32,
                       config.trainer.seed)  # the same seed: the same base weights the run started from
    trained = load_pretrained(run_dir / "hf")  # merged: W + s B A
    changed = {name for name, p in base.state_dict().items() if not torch.equal(p, trained.state_dict()[name])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(config.model.num_hidden_layers)
                       for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_lora_run_exports_an_adapter_that_peft_loads(lora_run, tmp_path):
    from launcher.data import load_tokenizer
    from launcher.model_factory import build_model

    run_dir, config, _ = lora_run
    base = build_model(config.model, len(load_tokenizer(None, None)), torch.device("cpu"), torch.float32,
                       config.trainer.seed)
    save_pretrained(base, tmp_path / "base")
    ids = torch.randint(0, base.config.vocab_size, (1, 12))
    merged_logits = _hf_logits(run_dir / "hf", ids)
    torch.testing.assert_close(_peft_logits(tmp_path / "base", run_dir / "adapter", ids), merged_logits,
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- QLoRA

GPU = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")


def _bitsandbytes_4bit_works() -> bool:
    """bitsandbytes imports and its backend for DEVICE quantises (its CPU backend may be missing)."""
    try:
        import bitsandbytes as bnb

        weight = bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="nf4").to(DEVICE)
        return weight.quant_state is not None
    except Exception:  # noqa: BLE001 - any failure means: no 4-bit backend here
        return False


def _qlora_model(compute_dtype: str, seed=0) -> DecoderLM:
    from launcher.config import PeftConfig
    from launcher.model_factory import add_adapters

    torch.manual_seed(seed)
    model = DecoderLM(DecoderConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 128})).to(DEVICE)
    return add_adapters(model, PeftConfig(method="qlora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage="uint8"))


def _qlora_trains(model: DecoderLM, autocast_dtype: torch.dtype | None, merged_tolerance: float) -> None:
    from launcher.peft_export import merged

    assert model.model.layers[0].self_attn.q_proj.quant_state is not None  # adapted and 4-bit
    assert type(model.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"  # not adapted, 4-bit
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2  # A and B of q and v in 2 layers
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 61, (4, 16), device=DEVICE)
    losses = []
    for _ in range(8):
        with torch.autocast(DEVICE, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss_sum, n = model(ids, ids)
        (loss_sum / n).backward()
        assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss_sum.detach() / n))
    assert losses[-1] < losses[0] - 0.1, losses
    with torch.no_grad():  # the merged export (dequantised W + s B A) computes what the 4-bit model computes
        torch.testing.assert_close(merged(model).to(DEVICE).logits(ids), model.logits(ids),
                                   rtol=merged_tolerance, atol=merged_tolerance)


def test_qlora_trains_adapters_over_a_4bit_base():
    if not _bitsandbytes_4bit_works():
        pytest.skip(f"bitsandbytes 4-bit does not run on {DEVICE} here")
    _qlora_trains(_qlora_model("float32"), autocast_dtype=None, merged_tolerance=1e-4)


@GPU
@pytest.mark.gpu
def test_qlora_on_cuda_in_bf16_with_the_fused_op():
    from kernels.dispatch import resolve_ops

    model = _qlora_model("bfloat16")
    model.set_ops(resolve_ops("triton", torch.device(DEVICE)))
    _qlora_trains(model, autocast_dtype=torch.bfloat16, merged_tolerance=5e-2)  # bitsandbytes computes in bf16


@GPU
@pytest.mark.gpu
def test_qlora_base_reaches_the_device_quantised_one_weight_at_a_time():
    """build_model never holds the dense base on the device: a card smaller than it trains QLoRA."""
    from launcher.config import ModelConfig, PeftConfig
    from launcher.model_factory import build_model

    model_cfg = ModelConfig(vocab_size=64, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=8)
    blocks_dense = 8 * (4 * 512 * 512 + 3 * 512 * 2048) * 2  # bf16 bytes, 64 MiB
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = build_model(model_cfg, 64, torch.device("cuda"), torch.bfloat16, seed=0,
                        peft=PeftConfig(method="qlora", bnb_4bit_quant_storage="uint8"))
    peak = torch.cuda.max_memory_allocated() - before
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert peak < blocks_dense / 2, (peak, blocks_dense)  # 4-bit blocks (a quarter) and one weight in flight


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["qkv-q-and-v-only-bias", "gate_up-grouped"])
def test_lora_projections_under_bf16_autocast(case):
    from kernels import ops

    in_dim, outs, adapted, rank, bias = GROUPS[case]
    group = _group(in_dim * 8, [o * 8 for o in outs], adapted, rank, torch.float32, bias)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = _run(ops.lora_projections, group, scaling=0.7, dropout_p=0.0)
        ref_out, ref_grads = _run(reference.lora_projections, group, scaling=0.7, dropout_p=0.0)
    assert out[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    true_out, true_grads = _fp32_truth(group, scaling=0.7)
    _assert_no_worse_than_reference(out + grads, ref_out + ref_grads, true_out + true_grads)


def test_qlora_through_launch_under_fsdp_resumes_under_ddp_and_exports(tmp_path):
    """The user's path: launch shards the 4-bit base with FSDP2, checkpoints, and another strategy resumes."""
    if not _bitsandbytes_4bit_works():
        pytest.skip(f"bitsandbytes 4-bit does not run on {DEVICE} here")
    from test_strategies import launch

    run_dir = tmp_path / "run"
    qlora = ["peft=qlora", "peft.bnb_4bit_compute_dtype=float32", "trainer.precision=fp32", "trainer.device=cpu",
             "cluster.nproc_per_node=2", "data.eval_exact_match=false"]
    first = launch(run_dir, *qlora, "strategy=fsdp")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    assert (run_dir / "checkpoints" / "step-00000003").is_dir()
    resumed = launch(run_dir, *qlora, "strategy=ddp", "trainer.max_steps=5", "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # the second run went on from the fsdp checkpoint
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    ids = torch.randint(0, json.loads((run_dir / "hf" / "config.json").read_text())["vocab_size"], (1, 9))
    assert torch.isfinite(_hf_logits(run_dir / "hf", ids)).all()  # the merged, dequantised export loads

    from safetensors.torch import load_file

    from launcher.export import export  # `launch export` of the last checkpoint: the run's own export, again

    merged_dir = export(run_dir, tmp_path / "exported")
    assert merged_dir == tmp_path / "exported" / "merged"
    torch.testing.assert_close(_hf_logits(merged_dir, ids), _hf_logits(run_dir / "hf", ids), rtol=0, atol=0)
    exported, own = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "exported", run_dir / "adapter"))
    assert exported.keys() == own.keys() and all(torch.equal(exported[k], own[k]) for k in own)


# ------------------------------------------------------------------------------- strategies

def lora_worker(spec: dict) -> dict:
    """test_strategies' setup (data, config, model size) with adapters: losses, eval, exported weights."""
    import contextlib

    from test_strategies import GLOBAL_BATCH, PAD, STEPS, VOCAB, make_config, make_examples

    from launcher import evaluate
    from launcher.data import GlobalBatchSampler, collate
    from launcher.loop import Precision, lr_lambda, train_step
    from strategies import build_strategy

    torch.set_num_threads(1)
    cfg = make_config(spec)
    strategy = build_strategy(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD))
    apply_lora(model, LoraSpec(r=4, lora_alpha=8))
    if spec.get("qlora"):  # stored as FSDP gathers fp32 parameters (peft.bnb_4bit_quant_storage=auto)
        quantize_base_4bit(model, QuantSpec(compute_dtype=torch.float32, quant_storage=torch.float32))
    model = strategy.setup(model, lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lr_lambda(cfg))
    examples = make_examples()
    sampler = GlobalBatchSampler(len(examples), GLOBAL_BATCH, seed=0)
    losses, norms = [], []
    for step in range(STEPS):
        micro_batches = [collate([examples[i] for i in idx], PAD) for idx in
                         sampler.micro_batches(step, strategy.rank, strategy.world_size, spec["micro"])]
        loss, grad_norm, _ = train_step(model, strategy, micro_batches, Precision.resolve("fp32", strategy.device),
                                        PAD, cfg.trainer.grad_clip)
        scheduler.step()
        losses.append(float(loss))
        norms.append(float(grad_norm))
    view = strategy.unwrapped()
    result = {"losses": losses, "grad_norms": norms, "world_size": strategy.world_size,
              "eval_loss": evaluate.eval_loss(view, examples[:8], 4, PAD, strategy.device, contextlib.nullcontext),
              "optimized": sum(p.numel() for g in strategy.optimizer.param_groups for p in g["params"])}
    with torch.no_grad():
        result["logits"] = view.logits(torch.tensor([examples[0].input_ids]))[0, -1].clone()
    from torch.distributed.tensor import DTensor

    from kernels.models.lora import quant_states
    from launcher.peft_export import merged

    core = strategy.export_module()
    if strategy.is_main:  # QLoRA: dense (dequantised) weights, whatever storage the strategy's export returns
        dense = merged(core).state_dict() if spec.get("qlora") else core.state_dict()
        result["state"] = {k: v.detach().float().cpu().clone() for k, v in dense.items()}
        adapters = {k: v for k, v in core.state_dict().items() if ".lora_" in k}
        result["adapter_numel"] = sum(v.numel() for v in adapters.values())
        result["lora_B_abs_sum"] = float(sum(v.abs().sum() for k, v in adapters.items() if ".lora_B." in k))
    if spec.get("qlora") and spec["strategy"]["name"] == "fsdp":  # how much of the 4-bit storage this rank holds
        params = dict(view.named_parameters())
        storages = [params[name] for name in quant_states(view)]
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in storages)
        result["local_4bit_share"] = local / sum(p.numel() for p in storages)
    return result


def run_lora_distributed(tmp_path: Path, **spec) -> dict:
    from test_strategies import env

    spec["out"] = str(tmp_path / "result.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               json.dumps(spec)]
    result = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(spec["out"], weights_only=False)


STRATEGY_CASES = [  # (strategy, QLoRA base)
    pytest.param({"name": "fsdp"}, False, id="fsdp"),  # frozen and trainable parameters in one fully_shard group
    pytest.param({"name": "ddp"}, False, id="ddp", marks=pytest.mark.slow),
    pytest.param({"name": "zero2", "zero_stage": 2}, False, id="zero2", marks=pytest.mark.slow),
    pytest.param({"name": "zero3", "zero_stage": 3}, False, id="zero3", marks=pytest.mark.slow),
    pytest.param({"name": "ddp"}, True, id="ddp-qlora", marks=pytest.mark.slow),
    pytest.param({"name": "fsdp"}, True, id="fsdp-qlora"),  # the 4-bit storage sharded like any parameter
    pytest.param({"name": "zero2", "zero_stage": 2}, True, id="zero2-qlora", marks=pytest.mark.slow),
    pytest.param({"name": "zero3", "zero_stage": 3}, True, id="zero3-qlora"),
]


@pytest.fixture(scope="module")
def one_process_runs() -> dict:
    return {}


@pytest.mark.parametrize("strategy,qlora", STRATEGY_CASES)
def test_lora_under_a_data_parallel_strategy_follows_one_process(strategy, qlora, one_process_runs, tmp_path):
    if qlora and not _bitsandbytes_4bit_works():
        pytest.skip(f"bitsandbytes 4-bit does not run on {DEVICE} here")
    if qlora not in one_process_runs:
        one_process_runs[qlora] = lora_worker({"strategy": {"name": "single"}, "micro": 2, "qlora": qlora})
    lora_reference = one_process_runs[qlora]
    result = run_lora_distributed(tmp_path, micro=2, strategy=strategy, qlora=qlora)
    assert result["world_size"] == 2
    assert result["losses"] == pytest.approx(lora_reference["losses"], rel=1e-5)
    assert result["losses"][-1] < result["losses"][0]
    assert result["grad_norms"] == pytest.approx(lora_reference["grad_norms"], rel=1e-4)
    assert result["eval_loss"] == pytest.approx(lora_reference["eval_loss"], rel=1e-5)
    torch.testing.assert_close(result["logits"], lora_reference["logits"], rtol=1e-5, atol=1e-5)
    assert result["state"].keys() == lora_reference["state"].keys()
    for name, tensor in result["state"].items():  # DeepSpeed's flat buffers round differently: atol 5e-5
        torch.testing.assert_close(tensor, lora_reference["state"][name], rtol=1e-5, atol=5e-5, msg=name)
    assert lora_reference["optimized"] == lora_reference["adapter_numel"]  # the optimizer holds the adapters only
    assert result["adapter_numel"] == lora_reference["adapter_numel"] and result["lora_B_abs_sum"] > 0
    if qlora and strategy["name"] == "fsdp":  # each of the 2 ranks holds half of the 4-bit storage
        assert result["local_4bit_share"] == pytest.approx(0.5, abs=0.01)


if __name__ == "__main__":
    from strategies.distributed import shutdown

    worker_spec = json.loads(sys.argv[1])
    worker_result = lora_worker(worker_spec)
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(worker_result, worker_spec["out"])
    shutdown()
