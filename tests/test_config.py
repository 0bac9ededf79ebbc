"""Every shipped config composes and validates; bad input fails fast, in one line, leaving nothing."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher.batching import BatchPlan, scaled_lr
from launcher.compose import CONF_DIR, ConfigError, compose_config, to_config, validate

GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONF_DIR.iterdir() if group.is_dir()
    for option in group.glob("*.yaml")
)
NEEDS_DATA_PATH = {"text", "prompt_completion", "chat", "alpaca"}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_shipped_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option in NEEDS_DATA_PATH:
        data = tmp_path / "train.jsonl"
        data.write_text('{"text": "x", "prompt": "p", "completion": "c"}\n')
        overrides.append(f"data.path={data}")
    config = to_config(compose_config(overrides))
    assert getattr(config, group) is not None


def test_default_config_is_the_demo_job():
    config = to_config(compose_config([]))
    assert (config.model.name, config.data.name, config.strategy.name) == ("tiny", "demo", "single")
    assert config.trainer.seq_len == 32  # the demo brings its own trainer values


def test_demo_trainer_values_go_away_with_other_data(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "x"}\n')
    config = to_config(compose_config(["data=text", f"data.path={data}"]))
    assert config.trainer.seq_len == 2048


@pytest.mark.parametrize("overrides,expected", [
    (["trainer.bogus=1"], "trainer.bogus: no such key"),
    (["+trainer.bogus=1"], "trainer.bogus: no such key"),
    (["trainer.max_steps=abc"], "trainer.max_steps"),
    (["trainer.max_steps=0"], "trainer.max_steps: must be > 0"),
    (["model=nope"], "model=nope: no such option; available:"),
    (["model.path=/nonexistent"], "model.path=/nonexistent: no such file"),
    (["optim.schedule=cubic"], "optim.schedule: got 'cubic'"),
    (["trainer.global_batch_size=60"], "trainer.global_batch_size: 60 is not a multiple"),
    (["data=text"], "data.path: required for data=text"),
    (["model.kernels=cuda"], "model.kernels"),
    (["trainer.activation_checkpointing=some"], "trainer.activation_checkpointing: got 'some'"),
    (["strategy=zero3", "trainer.activation_checkpointing=auto"], "trainer.activation_checkpointing=auto: its trial"),
    pytest.param(["trainer.activation_checkpointing=auto"], "trainer.activation_checkpointing=auto: fits the",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused only off the GPU")),
])
def test_bad_input_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        validate(overrides, multirun=False)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_every_sweep_job_is_validated():
    with pytest.raises(ConfigError, match="trainer.max_steps: must be > 0"):
        validate(["trainer.max_steps=5,0"], multirun=True)
    assert len(validate(["trainer.max_steps=5,6", "optim.lr=1e-3,2e-3"], multirun=True)) == 4


@pytest.mark.parametrize("argument,expected", [
    ("trainer.bogus=1", "trainer.bogus"),
    ("model.path=/nonexistent", "model.path=/nonexistent"),
])
def test_launch_fails_fast_in_one_line_and_writes_nothing(argument, expected, tmp_path):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "launcher", argument], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(Path.cwd())))
    assert time.perf_counter() - started < 10
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error:") and expected in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, not even an empty one


def test_batch_plan_derives_accumulation_and_suggests_fixes():
    plan = BatchPlan.resolve(global_batch_size=64, micro_batch_size=4, world_size=2)
    assert plan.accumulation_steps == 8
    with pytest.raises(ValueError, match=r"nearest valid global_batch_size: 48 or 72"):
        BatchPlan.resolve(global_batch_size=60, micro_batch_size=4, world_size=6)


def test_lr_scaling_is_explicit():
    assert scaled_lr(1e-3, "none", 256, 64) == 1e-3
    assert scaled_lr(1e-3, "linear", 256, 64) == pytest.approx(4e-3)
    assert scaled_lr(1e-3, "sqrt", 256, 64) == pytest.approx(2e-3)
