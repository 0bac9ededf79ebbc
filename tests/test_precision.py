"""trainer.precision: auto's choice per device, and fp16 autocast with dynamic loss scaling (CPU autocast + GradScaler)."""
from __future__ import annotations

import json

import pytest
import torch

from launcher.compose import compose_config, to_config
from launcher.loop import train
from launcher.precision import Precision
from strategies.base import Strategy

SHORT = ["trainer.precision=fp16_autocast", "trainer.log_every=1", "trainer.deterministic=true",
         "trainer.export_hf=false", "data.max_eval_examples=8", "data.eval_exact_match=false"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bf16_supported,expected", [(True, "bf16_autocast"), (False, "fp16_autocast")])
def test_auto_picks_fp16_with_loss_scaling_on_gpus_without_bf16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert Precision.resolve("auto", torch.device("cuda")) == Precision.resolve(expected, torch.device("cuda"))
    assert Precision.resolve("auto", torch.device("cuda")).scales_loss == (expected == "fp16_autocast")
    assert Precision.resolve("auto", torch.device("cpu")).autocast_dtype is None


def test_overflowed_fp16_steps_are_skipped_and_counted_not_fatal(tmp_path, monkeypatch):
    # A loss scale far above fp16's range: the first steps overflow until the scaler has halved it enough.
    monkeypatch.setattr(Strategy, "grad_scaler", lambda self: torch.amp.GradScaler(self.device.type, init_scale=2.0**26))
    summary = train(to_config(compose_config([*SHORT, "trainer.max_steps=14", "trainer.max_nonfinite_steps=2"])),
                    tmp_path)
    log = rows(tmp_path)
    overflows = [row["overflow_steps"] for row in log]
    assert overflows[0] == 1 and overflows[-1] > 2  # more in a row than max_nonfinite_steps, and the run went on
    assert all(row["skipped_steps"] == 0 for row in log)  # an overflow is the scaler's business, not a strike
    first_clean = overflows.index(overflows[-1])
    assert log[-1]["loss"] < log[first_clean]["loss"]  # it trains once the scale fits
    assert summary["overflow_steps"] == overflows[-1]


def test_fp16_resume_restores_the_loss_scale_and_follows_the_trajectory(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(to_config(compose_config([*SHORT, "trainer.max_steps=6", "trainer.save_every=3"])), straight)
    state = json.loads((straight / "checkpoints" / "step-00000003" / "trainer.json").read_text())
    assert state["grad_scaler"]["scale"] > 0
    middle = straight / "checkpoints" / "step-00000003"
    train(to_config(compose_config([*SHORT, "trainer.max_steps=6", f"trainer.resume={middle}"])), resumed)
    expected = {row["step"]: row["loss"] for row in rows(straight)}
    assert {row["step"]: row["loss"] for row in rows(resumed)} == {step: expected[step] for step in (4, 5, 6)}


def test_fp16_under_fsdp_follows_ddp(tmp_path):
    """FSDP2 scales with ShardedGradScaler: its found-inf flags are agreed over the mesh, so it tracks DDP."""
    from test_strategies import launch, metrics

    losses = {}
    for strategy in ("ddp", "fsdp"):
        run_dir = tmp_path / strategy
        result = launch(run_dir, f"strategy={strategy}", "cluster.nproc_per_node=2", "trainer.device=cpu",
                        "trainer.precision=fp16_autocast", "trainer.export_hf=false")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        losses[strategy] = [row["loss"] for row in metrics(run_dir)]
        assert "overflow_steps" in metrics(run_dir)[-1]
    torch.testing.assert_close(losses["fsdp"], losses["ddp"], rtol=2e-3, atol=0)  # fp16 rounding, not a drift
