"""The default job end to end, shortened: run dir contents, export, resume."""
from __future__ import annotations

import json

import pytest
import torch

from launcher.compose import compose_config, to_config
from launcher.loop import train
from strategies import checkpoint

SHORT = ["trainer.max_steps=6", "trainer.log_every=1", "data.max_eval_examples=16"]


def run(tmp_path, *overrides):
    return train(to_config(compose_config([*SHORT, *overrides])), tmp_path)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run(run_dir)


def test_run_dir_holds_metrics_checkpoint_summary_export(finished_run):
    run_dir, summary = finished_run
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= row.keys()
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert checkpoint.is_committed(run_dir / "checkpoints" / "step-00000006")
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000006"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    assert summary["final_eval"]["eval_loss"] < summary["initial_eval"]["eval_loss"]


def test_export_loads_in_transformers_with_matching_logits(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernels.models import load_pretrained

    export = finished_run[0] / "hf"
    theirs = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ours = load_pretrained(export).eval()
    ids = AutoTokenizer.from_pretrained(export)("reverse: abcd\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ids), theirs(ids).logits.float(), rtol=1e-4, atol=1e-4)


def test_resume_follows_the_uninterrupted_trajectory(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(straight, "trainer.max_steps=8", "trainer.deterministic=true")
    run(interrupted, "trainer.max_steps=4", "trainer.deterministic=true")
    run(interrupted, "trainer.max_steps=8", "trainer.deterministic=true")  # resume=auto picks step 4
    resumed = {r["step"]: r["loss"] for r in metrics(interrupted)}
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == {r["step"]: r["loss"] for r in metrics(straight)}  # bitwise on CPU fp32


def test_resume_never_starts_over(tmp_path):
    run(tmp_path, "trainer.max_steps=2")
    run(tmp_path, "trainer.max_steps=2", "trainer.resume=never", "trainer.export_hf=false")
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 1, 2]
