"""`trainer.dry_run=true` / `launch --dry-run`: the plan without training, the model on the meta device."""
from __future__ import annotations

import time

import pytest
import torch

from launcher.compose import compose_config, to_config
from launcher.dry_run import GIB, build_meta_model, dry_run


def test_tiny_dry_run_counts_what_training_would_build_and_trains_nothing(tmp_path, capsys):
    from launcher.loop import train

    plan = train(to_config(compose_config(["trainer.dry_run=true"])), tmp_path)
    assert plan["params"] == plan["trainable_params"] == 795_904  # the tiny model, as the start table says
    assert (plan["world_size"], plan["micro_batch_size"], plan["accumulation_steps"]) == (1, 32, 2)
    assert list(tmp_path.iterdir()) == []  # no metrics, no checkpoint
    out = capsys.readouterr().out
    assert "dry run (nothing trained)" in out and "max_steps: 600" in out  # the resolved config is printed


def test_8b_fsdp_on_8_ranks_is_planned_instantly_on_the_meta_device():
    cfg = to_config(compose_config(["model=llama3_8b", "strategy=fsdp", "cluster.nproc_per_node=8",
                                    "trainer.micro_batch_size=8", "trainer.activation_checkpointing=full"]))
    started = time.perf_counter()
    plan = dry_run(cfg)
    assert time.perf_counter() - started < 10
    assert all(p.is_meta for p in build_meta_model(cfg).parameters())  # nothing allocated
    assert plan["params"] == pytest.approx(8.03e9, rel=1e-3) and plan["accumulation_steps"] == 1
    memory = plan["memory_gib"]
    # bf16_autocast (auto on a GPU): fp32 weights and gradients, two fp32 AdamW states, all sharded over 8
    assert memory["weights"] == pytest.approx(plan["params"] * 4 / 8 / GIB)
    assert memory["optimizer"] == pytest.approx(2 * memory["gradients"]) == pytest.approx(2 * memory["weights"])
    assert 0 < memory["activations"] < memory["total"] < 80
    assert plan["flops_per_token"] == pytest.approx(6 * 7.5e9, rel=0.01)  # 6 x (non-embedding + LM head)


def test_ddp_replicates_and_zero3_shards(capsys):
    def plan(*overrides):
        return dry_run(to_config(compose_config(["model=llama3_1b", "cluster.nproc_per_node=4",
                                                 "trainer.micro_batch_size=8", *overrides])))["memory_gib"]

    ddp, zero3 = plan("strategy=ddp"), plan("strategy=zero3", "trainer.precision=bf16_autocast")
    assert ddp["weights"] == pytest.approx(4 * zero3["weights"] * 2)  # fp32 replicated vs bf16 sharded over 4
    assert ddp["gathered"] == 0 < zero3["gathered"]


def test_launch_dry_run_flag(tmp_path, monkeypatch, capsys):
    from launcher.cli import main as launch

    monkeypatch.chdir(tmp_path)
    launch(["--dry-run", "model=llama3_8b", "trainer.micro_batch_size=8", f"hydra.run.dir={tmp_path}/run"])
    assert "parameters     8,030,261,248 total" in capsys.readouterr().out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_checkpointing_modes_in_the_activation_estimate():
    def activations(mode):
        overrides = ["model=llama3_8b", "peft=lora", "trainer.micro_batch_size=4", "trainer.seq_len=2048",
                     "trainer.precision=bf16", f"trainer.activation_checkpointing={mode}"]
        return dry_run(to_config(compose_config(overrides)), show=False)["memory_gib"]["activations"]

    tokens, layers, hidden = 4 * 2048, 32, 4096
    one_block = activations("full") - tokens * layers * hidden * 2 / GIB  # bf16: 2 bytes an element
    assert activations("offload") == pytest.approx(one_block + tokens * 2 * hidden * 2 / GIB)
    assert activations("auto") == activations("offload")  # planned so; the GPU search may keep blocks whole
    assert activations("none") == pytest.approx(layers * one_block)


def test_a_dense_down_projection_keeps_no_swiglu_product():
    """Full fine-tuning keeps gate and up (ops.swiglu_linear); LoRA's adapted down projection also its input."""
    def activations(*overrides):
        base = ["model=llama3_1b", "trainer.micro_batch_size=8", "trainer.seq_len=2048", "trainer.precision=bf16"]
        return dry_run(to_config(compose_config(base + list(overrides))), show=False)["memory_gib"]["activations"]

    tokens, layers, hidden, kv, intermediate = 8 * 2048, 16, 2048, 8 * 64, 8192
    assert activations() == pytest.approx(tokens * layers * (6 * hidden + 2 * kv + 2 * intermediate) * 2 / GIB)
    assert activations("peft=lora") - activations() == pytest.approx(tokens * layers * intermediate * 2 / GIB)


@pytest.mark.parametrize("precision,peft", [("bf16", "none"), ("bf16_autocast", "none"), ("bf16_autocast", "lora")])
def test_the_estimate_counts_what_the_blocks_keep_for_backward(precision, peft):
    """The activation and cast-weight terms against the bytes autograd really keeps (Triton ops)."""
    pytest.importorskip("triton")
    from kernels.dispatch import resolve_ops
    from kernels.models import DecoderConfig, DecoderLM
    from kernels.models.lora import LoraSpec, apply_lora
    from launcher.dry_run import memory_estimate
    from test_model_kernels import bytes_kept_for_backward

    cfg = to_config(compose_config([f"trainer.precision={precision}", f"peft={peft}", "trainer.micro_batch_size=2",
                                    "trainer.seq_len=256"]))
    config = DecoderConfig(vocab_size=128, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = DecoderLM(config, resolve_ops("triton", torch.device("cpu")))
    model = model.to(torch.bfloat16) if precision == "bf16" else model
    if peft == "lora":
        apply_lora(model, LoraSpec(r=8))
    ids = torch.randint(0, 128, (2, 256))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
        kept = bytes_kept_for_backward(model, lambda: model(ids, ids))
    estimate = memory_estimate(cfg, model, world_size=1)
    assert (estimate["activations"] + estimate["cast weights"]) * GIB == pytest.approx(kept, rel=0.1)
