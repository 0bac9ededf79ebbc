"""optim=adamw_8bit | paged_adamw | paged_adamw_8bit (bitsandbytes): they train, checkpoint and resume exactly."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launcher.compose import ConfigError, compose_config, to_config, validate
from launcher.loop import train

pytest.importorskip("bitsandbytes")

SHORT = ["trainer.log_every=1", "trainer.deterministic=true", "trainer.export_hf=false", "data.max_eval_examples=8",
         "trainer.max_steps=6", "trainer.save_every=3"]


def run(run_dir, *overrides):
    return train(to_config(compose_config([*SHORT, *overrides])), run_dir)


def losses(run_dir):
    return {row["step"]: row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_resume_from_a_checkpoint_follows_the_uninterrupted_trajectory(tmp_path, optimizer):
    straight = tmp_path / "straight"
    run(straight, f"optim={optimizer}")
    middle = straight / "checkpoints" / "step-00000003"
    resumed = tmp_path / "resumed"
    run(resumed, f"optim={optimizer}", f"trainer.resume={middle}")
    expected = losses(straight)
    assert losses(resumed) == {step: expected[step] for step in (4, 5, 6)}  # bitwise on CPU fp32
    assert expected[6] < expected[1]


def test_8bit_states_are_saved_quantised(tmp_path):
    run(tmp_path, "optim=adamw_8bit", "trainer.save_every=0")
    metadata = dcp.FileSystemReader(str(tmp_path / "checkpoints" / "step-00000006")).read_metadata()
    moments = {key: meta.properties.dtype for key, meta in metadata.state_dict_metadata.items()
               if key.startswith("optim.state.") and key.endswith((".state1", ".state2"))}
    # bitsandbytes keeps fp32 moments for tensors under 4096 elements (the norms): matrices only are 8-bit
    matrices = {key: dtype for key, dtype in moments.items() if "_proj." in key or "embed_tokens." in key}
    assert len(matrices) == 2 * (1 + 4 * 7) and set(matrices.values()) == {torch.uint8}


@pytest.mark.parametrize("strategy,reason", [("zero1", "DeepSpeed ZeRO"), ("zero3", "DeepSpeed ZeRO"),
                                             ("fsdp", "DTensors"), ("hsdp", "DTensors")])
def test_sharding_strategies_take_only_adamw(strategy, reason):
    with pytest.raises(ConfigError, match=f"optim=adamw_8bit: .*{reason}.* strategy={strategy}"):
        validate([f"strategy={strategy}", "optim=adamw_8bit", "cluster.nproc_per_node=2"], multirun=False)
