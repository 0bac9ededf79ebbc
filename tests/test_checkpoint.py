"""Checkpoints: verified resume, failed saves, preemption, resharding across strategies and world sizes, export.

CPU, fp32, the demo job shortened. Runs in this process where one process will do;
`launch` (which starts torchrun, gloo) for 2 ranks; a real `python -m launcher.train`
process for the signal. Losses after a resume equal the uninterrupted run's: bitwise
in one process (trainer.deterministic=true), rel 1e-6 across processes, and rel 1e-5
where the world size changes (the reduction order of the loss and gradients changes).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.compose import compose_config, to_config
from launcher.loop import train
from strategies import checkpoint
from test_strategies import env, launch, metrics, signal_after_rows

SHORT = ["trainer.log_every=1", "data.max_eval_examples=8", "data.eval_exact_match=false", "trainer.export_hf=false",
         "trainer.deterministic=true", "logger.progress_bar=false"]
STEPS, HALF = 8, 4  # the uninterrupted reference run's length, and where the resharding runs switch


def run(run_dir: Path, *overrides: str) -> dict:
    return train(to_config(compose_config([*SHORT, *overrides])), run_dir)


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run_dir)}


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


# ----------------------------------------------------------------------------- integrity

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A run with committed checkpoints at steps 1 and 2."""
    run_dir = tmp_path_factory.mktemp("saved")
    run(run_dir, "trainer.max_steps=2", "trainer.save_every=1")
    return run_dir


@pytest.fixture
def copy_of(two_checkpoints, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    return run_dir


def identity(run_dir: Path) -> dict:
    return json.loads((step_dir(run_dir, 1) / checkpoint.TRAINER_STATE).read_text())["identity"]


def test_manifest_covers_every_file_and_the_run_is_stamped(two_checkpoints):
    path = step_dir(two_checkpoints, 2)
    files = json.loads((path / checkpoint.MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {checkpoint.MANIFEST, checkpoint.COMMIT_MARKER}
    assert {".metadata", "__0_0.distcp", "rng-rank00000.pt", "trainer.json"} <= set(files)
    state = json.loads((path / checkpoint.TRAINER_STATE).read_text())
    assert state["identity"]["model"]["hidden_size"] == 128 and len(state["config_sha256"]) == 64
    assert checkpoint.problem(path, state["identity"]) is None


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(data)


def _other_model(path: Path) -> None:
    """As if another model's run had written it: trainer state and manifest consistent, identity different."""
    state = json.loads((path / checkpoint.TRAINER_STATE).read_text())
    state["identity"]["model"]["hidden_size"] = 64
    (path / checkpoint.TRAINER_STATE).write_text(json.dumps(state))
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"][checkpoint.TRAINER_STATE] = checkpoint._describe(path / checkpoint.TRAINER_STATE)
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))


DAMAGES = {  # what is done to the newest checkpoint, and the problem reported
    "no marker": (lambda p: (p / checkpoint.COMMIT_MARKER).unlink(), "no COMMITTED marker"),
    "missing shard": (lambda p: (p / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    "truncated shard": (lambda p: os.truncate(p / "__0_0.distcp", 1000), "__0_0.distcp has 1000 bytes"),
    "flipped byte": (lambda p: _flip_byte(p / "__0_0.distcp"), "__0_0.distcp fails its checksum"),
    "other model": (_other_model, "model.hidden_size: checkpoint 64, this run 128"),
}


def test_without_checksums_only_a_flipped_byte_goes_unseen(copy_of):
    """trainer.verify_checkpoints=false: metadata, sizes and identity are still checked; the bytes are not."""
    newest = step_dir(copy_of, 2)
    _flip_byte(newest / "__0_0.distcp")
    assert checkpoint.select_resume("auto", copy_of / "checkpoints", identity(copy_of), checksums=False) == newest
    os.truncate(newest / "__0_0.distcp", 1000)
    assert checkpoint.select_resume("auto", copy_of / "checkpoints", identity(copy_of),
                                    checksums=False) == step_dir(copy_of, 1)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_is_skipped_by_auto_and_refused_by_path(damage, copy_of, caplog):
    damage_fn, problem = DAMAGES[damage]
    newest = step_dir(copy_of, 2)
    damage_fn(newest)
    with caplog.at_level(logging.WARNING, logger="strategies.checkpoint"):
        chosen = checkpoint.select_resume("auto", copy_of / "checkpoints", identity(copy_of))
    assert chosen == step_dir(copy_of, 1)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(newest) in warning and problem in warning
    with pytest.raises(ValueError, match=f"trainer.resume={newest}: .*{problem}"):
        checkpoint.select_resume(str(newest), copy_of / "checkpoints", identity(copy_of))


def test_resume_falls_back_past_a_corrupted_checkpoint_and_replaces_it(two_checkpoints, copy_of, caplog):
    _flip_byte(step_dir(copy_of, 2) / "__0_0.distcp")
    with caplog.at_level(logging.INFO):
        run(copy_of, "trainer.max_steps=3", "trainer.save_every=1", "trainer.keep_last=3")
    assert f"resumed from {step_dir(copy_of, 1)} at step 1" in caplog.text
    # the replayed step 2 matches the original one bit for bit; step 2 is saved again, whole and sound
    rows = metrics(copy_of)
    assert [r["step"] for r in rows] == [1, 2, 2, 3] and rows[1]["loss"] == rows[2]["loss"]
    for step in (1, 2, 3):
        assert checkpoint.problem(step_dir(copy_of, step), identity(copy_of)) is None
    assert not list((copy_of / "checkpoints").glob(".*-step-*"))


def test_disk_full_mid_save_keeps_the_previous_checkpoint(copy_of, monkeypatch):
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def full_disk(state, checkpoint_id):  # half a shard reaches the disk, then the device is full
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointSaveError) as err:
        run(copy_of, "trainer.max_steps=3")
    message = str(err.value)
    assert f"saving checkpoint {step_dir(copy_of, 3)}" in message and "No space left on device" in message
    assert f"the previous checkpoint {step_dir(copy_of, 2)} is intact" in message and "\n" not in message
    root = copy_of / "checkpoints"
    assert (root / "latest").read_text() == "step-00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001", "step-00000002"]  # no temp dir
    assert checkpoint.problem(step_dir(copy_of, 2), identity(copy_of)) is None

    monkeypatch.setattr(dcp, "save", real_save)  # space freed: the same command resumes from step 2
    assert run(copy_of, "trainer.max_steps=3")["steps_this_run"] == 1
    assert (root / "latest").read_text() == "step-00000003"


# ----------------------------------------------------------------------------- preemption

def test_signal_handler_only_records_and_is_restored():
    from launcher import preemption
    from strategies.checkpoint import OneProcess

    @preemption.handles_preemption
    def body():
        check = preemption.PreemptionCheck(OneProcess())
        assert check() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        return check()

    before = signal.getsignal(signal.SIGUSR1)
    assert body() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_ranks_agree_on_a_signal_one_boundary_later():
    """Several ranks read the all-reduce started at the previous boundary: no stall, the same answer everywhere."""
    from launcher import preemption
    from strategies.checkpoint import OneProcess

    class TwoRanks(OneProcess):
        world_size, device = 2, torch.device("cpu")
        reduced = []

        def all_reduce_sum(self, value):
            self.reduced.append(value.clone())
            return value

    @preemption.handles_preemption
    def body():
        check = preemption.PreemptionCheck(TwoRanks())
        answers = [check()]
        os.kill(os.getpid(), signal.SIGTERM)
        answers += [check(), check()]
        return answers

    assert body() == [None, None, "SIGTERM"]
    assert len(TwoRanks.reduced) == 3  # one all-reduce per boundary


def test_sigusr1_checkpoints_at_the_step_boundary_and_the_resumed_run_matches(reference, tmp_path):
    preempted = tmp_path / "preempted"
    worker = subprocess.Popen([sys.executable, "-m", "launcher.train", *SHORT, f"trainer.max_steps={STEPS}",
                               f"hydra.run.dir={preempted}"],
                              cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = signal_after_rows(worker, preempted, rows=2, timeout=300)
    assert worker.returncode == 0, output[-3000:]
    summary = json.loads((preempted / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["preempted"] == "SIGUSR1" and 2 <= stopped < STEPS, summary
    assert f"SIGUSR1 received: stopped after step {stopped}" in output
    assert summary["checkpoint"] == str(step_dir(preempted, stopped))
    assert checkpoint.is_committed(step_dir(preempted, stopped)) and max(losses(preempted)) == stopped

    run(preempted, f"trainer.max_steps={STEPS}")  # resume=auto, as the same command would
    resumed = losses(preempted)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert list(resumed.values()) == pytest.approx(list(losses(reference).values()), rel=1e-6)


# ----------------------------------------------------------------------------- resharding

def launched(run_dir: Path, *overrides: str) -> Path:
    result = launch(run_dir, *SHORT, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, all STEPS steps, saving at HALF."""
    run_dir = tmp_path_factory.mktemp("reference")
    run(run_dir, f"trainer.max_steps={STEPS}", f"trainer.save_every={HALF}")
    return run_dir


@pytest.fixture(scope="module")
def first_half(tmp_path_factory) -> dict[str, Path]:
    """HALF steps on 2 ranks, under DDP (with its end-of-run export) and FSDP."""
    root = tmp_path_factory.mktemp("first_half")
    return {name: launched(root / name, f"strategy={name}", "cluster.nproc_per_node=2", f"trainer.max_steps={HALF}",
                           *(["trainer.export_hf=true"] if name == "ddp" else []))
            for name in ("ddp", "fsdp")}


RESHARDS = {  # name: (where the checkpoint comes from, the resuming run's overrides)
    "ddp 2 -> single 1": ("ddp", ["strategy=single"]),
    "single 1 -> ddp 2": ("reference", ["strategy=ddp", "cluster.nproc_per_node=2"]),
    "ddp 2 -> fsdp 2": ("ddp", ["strategy=fsdp", "cluster.nproc_per_node=2"]),
    "fsdp 2 -> fsdp 1": ("fsdp", ["strategy=fsdp", "cluster.nproc_per_node=1"]),
    "zero3 2 -> zero3 1": ("zero3", ["strategy=zero3", "cluster.nproc_per_node=1"]),  # via a universal checkpoint
}


@pytest.mark.parametrize("case", list(RESHARDS))
def test_resume_at_another_strategy_or_world_size_follows_the_trajectory(case, reference, request, tmp_path):
    source, overrides = RESHARDS[case]
    if source == "reference":
        source_dir = reference
    elif source == "zero3":  # the 2-rank runs start only for the cases that need them
        source_dir = request.getfixturevalue("zero_run")
    else:
        source_dir = request.getfixturevalue("first_half")[source]
    resume = f"trainer.resume={step_dir(source_dir, HALF)}"
    resumed_dir = tmp_path / "resumed"
    if "strategy=single" in overrides:
        run(resumed_dir, f"trainer.max_steps={STEPS}", resume)
    else:
        launched(resumed_dir, f"trainer.max_steps={STEPS}", resume, *overrides)
    expected = losses(reference)
    first, second = losses(source_dir), losses(resumed_dir)
    assert sorted(first)[:HALF] == list(range(1, HALF + 1)) and sorted(second) == list(range(HALF + 1, STEPS + 1))
    assert [first[s] for s in range(1, HALF + 1)] == pytest.approx([expected[s] for s in range(1, HALF + 1)], rel=1e-5)
    assert list(second.values()) == pytest.approx([expected[s] for s in second], rel=1e-5)


# ----------------------------------------------------------------------------- DeepSpeed and export

@pytest.fixture(scope="module")
def zero_run(tmp_path_factory) -> Path:
    """ZeRO-3 on 2 ranks (the core sits inside a wrapper there), HALF steps, with its end-of-run export."""
    return launched(tmp_path_factory.mktemp("zero") / "run", "strategy=zero3", "cluster.nproc_per_node=2",
                    f"trainer.max_steps={HALF}", "trainer.export_hf=true")


def test_zero_checkpoint_into_a_dcp_strategy_is_a_clear_error(zero_run):
    from strategies.zero import saved_world_size

    path = step_dir(zero_run, HALF)
    assert saved_world_size(path) == 2
    with pytest.raises(ValueError, match="written by a DeepSpeed strategy.*launch export"):
        checkpoint.load(path, model=None, optimizer=None, scheduler=None)


def assert_export_matches(exported: Path, live_export: Path) -> None:
    """`launch export` of the checkpoint = the run's own export of its live model; transformers loads it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernels.models import load_pretrained

    ours, live = load_file(exported / "model.safetensors"), load_file(live_export / "model.safetensors")
    assert ours.keys() == live.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], live[name], rtol=1e-6, atol=1e-7, msg=name)
    theirs = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(exported)("reverse: abcd\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, load_pretrained(live_export).eval().logits(ids),
                                   rtol=1e-4, atol=1e-4)


def test_export_from_a_two_rank_ddp_run(first_half, tmp_path):
    result = subprocess.run([sys.executable, "-m", "launcher", "export", f"run={first_half['ddp']}",
                             f"out={tmp_path / 'hf'}"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_export_matches(tmp_path / "hf", first_half["ddp"] / "hf")


def test_export_from_a_zero3_checkpoint(zero_run, tmp_path):
    from launcher.export import export

    export(step_dir(zero_run, HALF), tmp_path / "hf")  # a checkpoint directory, not the run directory
    assert_export_matches(tmp_path / "hf", zero_run / "hf")


def test_export_names_what_is_wrong(copy_of, tmp_path):
    from launcher.export import export

    with pytest.raises(ValueError, match="neither a run directory"):
        export(copy_of, tmp_path / "hf")  # an in-process run: no config.yaml
    result = subprocess.run([sys.executable, "-m", "launcher", "export", "run=x"], cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "run= and out= are required" in result.stderr


def test_export_of_a_lora_checkpoint_equals_the_runs_own_adapter_and_merged_model(tmp_path):
    from safetensors.torch import load_file

    from launcher.export import export

    from launcher.cli import write_resolved_config

    run_dir = tmp_path / "run"
    composed = compose_config([*SHORT, "trainer.max_steps=2", "peft=lora", "trainer.export_hf=true"])
    run_dir.mkdir()
    write_resolved_config(composed, run_dir)  # what `launch` writes: export reads the run's config
    train(to_config(composed), run_dir)
    adapter = tmp_path / "exported"
    out = export(run_dir, adapter)
    assert out == adapter / "merged"
    for exported, live in ((adapter / "adapter_model.safetensors", run_dir / "adapter" / "adapter_model.safetensors"),
                           (out / "model.safetensors", run_dir / "hf" / "model.safetensors")):
        ours, theirs = load_file(exported), load_file(live)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    assert (adapter / "adapter_config.json").is_file()


# ----------------------------------------------------------------------------- background writes

def test_async_checkpoints_commit_sound_and_resume_exactly(reference, tmp_path):
    """trainer.async_checkpoint: dcp.async_save writes while training goes on; each commit is as sound as a sync one."""
    run_dir = tmp_path / "async"
    run(run_dir, f"trainer.max_steps={STEPS}", "trainer.save_every=2", "trainer.keep_last=8",
        "trainer.async_checkpoint=true")
    committed = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert committed == [f"step-{s:08d}" for s in range(2, STEPS + 1, 2)]
    for name in committed:  # marker, manifest, sizes and every checksum
        path = run_dir / "checkpoints" / name
        identity = json.loads((path / checkpoint.TRAINER_STATE).read_text())["identity"]
        assert checkpoint.problem(path, identity) is None
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    resumed = tmp_path / "resumed"
    run(resumed, f"trainer.max_steps={STEPS}", f"trainer.resume={step_dir(run_dir, HALF)}")
    expected = losses(reference)
    assert losses(resumed) == {s: expected[s] for s in range(HALF + 1, STEPS + 1)}


def test_async_checkpoints_on_two_ranks_commit(tmp_path):
    """Two ranks: the background writer talks over its own gloo group, never the one training uses."""
    run_dir = tmp_path / "ddp-async"
    result = launch(run_dir, "strategy=ddp", "cluster.nproc_per_node=2", "trainer.save_every=1",
                    "trainer.keep_last=3", "trainer.async_checkpoint=true", "trainer.export_hf=false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for step in (1, 2, 3):
        path = step_dir(run_dir, step)
        assert checkpoint.problem(path, json.loads((path / checkpoint.TRAINER_STATE).read_text())["identity"]) is None
