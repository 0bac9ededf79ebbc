"""The non-finite step guard: a NaN loss skips the update on every rank, is counted, and too many stop the run.

NaNs are injected by the tests only: in-process by wrapping the model's forward, on
2 gloo ranks by this file's own worker (`torchrun ... tests/test_guards.py`), where
rank 1 alone produces a NaN loss at the step named in SLIPSTREAM_TEST_NAN_AT.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHORT = ["trainer.max_steps=6", "trainer.log_every=1", "data.max_eval_examples=8", "data.eval_exact_match=false",
         "trainer.export_hf=false", "trainer.global_batch_size=16", "trainer.micro_batch_size=8"]  # 2 micro per step
NAN_AT_ENV = "SLIPSTREAM_TEST_NAN_AT"  # "<rank>:<0-based step>", read by the worker below only


def nan_forward(monkeypatch, bad_steps: set[int], micro_per_step: int = 2) -> None:
    """Training forwards of the given 0-based steps return a NaN loss (the first micro-batch of each)."""
    from kernels.models import DecoderLM

    original = DecoderLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        loss_sum, count = original(self, *args, **kwargs)
        if self.training:  # evaluation forwards stay clean
            index, calls["n"] = calls["n"], calls["n"] + 1
            if index % micro_per_step == 0 and index // micro_per_step in bad_steps:
                loss_sum = loss_sum * float("nan")
        return loss_sum, count

    monkeypatch.setattr(DecoderLM, "forward", forward)


def make_examples(n: int = 8):
    """Variable-length sequences of random tokens, loss on the second half."""
    from kernels.reference import IGNORE_INDEX
    from launcher.data import Example

    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(n):
        ids = torch.randint(1, 50, (4 + 2 * i,), generator=gen).tolist()
        half = len(ids) // 2
        examples.append(Example("", "", ids[:-1], [IGNORE_INDEX] * (half - 1) + ids[half:], half))
    return examples


def tiny_model():
    from kernels.models import DecoderConfig, DecoderLM

    torch.manual_seed(0)
    return DecoderLM(DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2))


def run(tmp_path, *overrides):
    from launcher.compose import compose_config, to_config
    from launcher.loop import train

    return train(to_config(compose_config([*SHORT, *overrides])), tmp_path)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_guard_counts_and_stops_only_after_n_in_a_row():
    from launcher.guards import NonFiniteGuard

    guard, nan, one = NonFiniteGuard(2), torch.tensor(float("nan")), torch.tensor(1.0)
    for loss, norm in [(one, one), (nan, one), (one, one), (one, torch.tensor(float("inf")))]:
        guard.update(loss, norm)
        assert not guard.must_stop
    assert (guard.skipped, guard.in_a_row, guard.last_step_finite) == (2, 1, False)
    guard.update(nan, one)
    assert guard.must_stop
    assert "trainer.max_nonfinite_steps=2" in str(guard.error(5, nan, one, None))


def test_a_nan_step_leaves_parameters_and_optimizer_state_untouched(monkeypatch):
    from launcher.config import Config
    from launcher.data import collate
    from launcher.loop import Precision, train_step
    from strategies.single import SingleDevice

    model = tiny_model()
    strategy = SingleDevice(Config(), torch.device("cpu"))
    model = strategy.setup(model, lr=1e-2)
    examples = make_examples()
    batches = [collate(examples[:4], 0), collate(examples[4:], 0)]
    nan_forward(monkeypatch, bad_steps={1})
    snapshots, losses = [], []
    for _ in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss, grad_norm, _ = train_step(model, strategy, batches, Precision.resolve("fp32", torch.device("cpu")), 0,
                                        grad_clip=1.0)
        losses.append(float(loss))
        snapshots.append(all(torch.equal(before[n], p) for n, p in model.named_parameters()))
    assert [torch.isfinite(torch.tensor(x)).item() for x in losses] == [True, False, True]
    assert snapshots == [False, True, False]  # only the NaN step left the weights as they were
    assert all(p.grad is None for p in model.parameters())  # its gradients were dropped, not carried over
    adam_steps = {int(s["step"]) for s in strategy.optimizer.state.values()}
    assert adam_steps == {2}  # AdamW's step count did not advance for the skipped step


def test_run_skips_the_nan_step_logs_it_and_goes_on(monkeypatch, tmp_path):
    nan_forward(monkeypatch, bad_steps={2})
    summary = run(tmp_path)
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == list(range(1, 7))
    assert [r["skipped_steps"] for r in logged] == [0, 0, 1, 1, 1, 1]
    assert not torch.isfinite(torch.tensor(logged[2]["loss"]))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged[3:])
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert summary["skipped_steps"] == 1 and summary["checkpoint"].endswith("step-00000006")


def test_too_many_nan_steps_in_a_row_stop_without_saving_the_bad_state(monkeypatch, tmp_path):
    from launcher.guards import NonFiniteSteps

    nan_forward(monkeypatch, bad_steps={2, 3, 4, 5})
    with pytest.raises(NonFiniteSteps, match=r"steps 3\.\.5 in a row.*last good checkpoint is .*step-00000002"):
        run(tmp_path, "trainer.max_nonfinite_steps=3", "trainer.save_every=2")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert rows(tmp_path)[-1]["step"] == 5 and rows(tmp_path)[-1]["skipped_steps"] == 3
    assert not (tmp_path / "summary.json").exists()


# ----------------------------------------------------------------------------- 2 ranks, gloo

STEPS, BAD_STEP = 4, 2


def worker() -> None:
    """Every rank: DDP then FSDP, STEPS steps each; rank r's loss is NaN at step s when NAN_AT_ENV='r:s'."""
    from launcher.config import Config, StrategyConfig, TrainerConfig
    from launcher.data import collate
    from launcher.loop import Precision, train_step
    from strategies import build_strategy
    from strategies.distributed import shutdown

    torch.set_num_threads(1)
    bad_rank, bad_step = map(int, os.environ[NAN_AT_ENV].split(":"))
    examples = make_examples()
    results = {}
    for name in ("ddp", "fsdp"):
        cfg = Config(strategy=StrategyConfig(name=name), trainer=TrainerConfig(precision="fp32", device="cpu"))
        strategy = build_strategy(cfg, torch.device("cpu"))
        model = tiny_model()
        original = model.forward
        model.forward = lambda *a, **k: (lambda loss, n: (loss * nan_now[0], n))(*original(*a, **k))
        model = strategy.setup(model, lr=1e-2)
        mine = examples[strategy.rank * 4:(strategy.rank + 1) * 4]
        batches = [collate(mine[:2], 0), collate(mine[2:], 0)]
        losses, unchanged = [], []
        for step in range(STEPS):
            nan_now = [float("nan") if (strategy.rank, step) == (bad_rank, bad_step) else 1.0]
            before = [p.detach().clone() for p in model.parameters()]  # this rank's shards under FSDP
            loss, grad_norm, _ = train_step(model, strategy, batches, Precision.resolve("fp32", torch.device("cpu")),
                                            0, grad_clip=1.0)
            losses.append(float(loss))
            unchanged.append(all(torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())))
        results[name] = {"losses": losses, "unchanged": unchanged}
    Path(os.environ["RESULT_DIR"], f"rank{strategy.rank}.json").write_text(json.dumps(results))
    shutdown()


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               RESULT_DIR=str(tmp_path), **{NAN_AT_ENV: f"1:{BAD_STEP}"})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("ddp", "fsdp"):
        for result in ranks:
            finite = [x == x for x in result[name]["losses"]]  # NaN != NaN
            assert finite == [step != BAD_STEP for step in range(STEPS)], name
            assert result[name]["unchanged"] == [step == BAD_STEP for step in range(STEPS)], name
        both = [ranks[0][name]["losses"], ranks[1][name]["losses"]]
        assert [x for x in both[0] if x == x] == [x for x in both[1] if x == x], name  # the loss is global


if __name__ == "__main__":
    worker()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-skips-on-device", "unfused-host-check"])
def test_step_if_finite_skips_the_update_and_the_step_count(fused):
    from launcher.guards import _skips_on_device, step_if_finite

    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=fused)
    assert _skips_on_device(optimizer) == fused
    for loss, changes in ((torch.tensor(float("nan")), False), (torch.tensor(1.0), True)):
        before = weight.detach().clone()
        weight.grad = torch.ones(4)
        step_if_finite(optimizer, loss, torch.tensor(2.0))
        assert torch.equal(weight, before) != changes
        assert not hasattr(optimizer, "found_inf")
    assert int(optimizer.state[weight]["step"]) == 1  # the skipped step did not count
