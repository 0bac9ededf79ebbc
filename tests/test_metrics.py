"""Metrics rows, MFU arithmetic, the logger backends (wandb faked in-process) and their failure isolation."""
from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from launcher.compose import compose_config, to_config

SHORT = ["trainer.max_steps=6", "trainer.log_every=2", "trainer.eval_every=4", "data.max_eval_examples=8",
         "data.eval_exact_match=false", "trainer.export_hf=false",
         "trainer.global_batch_size=16", "trainer.micro_batch_size=8"]
ROW_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_per_device", "mfu", "mem_gib",
            "peak_mem_gib", "data_s", "compute_s", "checkpoint_s", "eval_s", "eta_s", "elapsed_s", "skipped_steps"}


class FakeWandb(types.ModuleType):
    """What the wandb backend calls: init (kwargs recorded), run.log / summary / finish."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # find_spec("wandb") finds it
        self.logged, self.summary, self.finished, self.init_kwargs = [], {}, False, None

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        files = Path(kwargs["dir"]) / "wandb" / f"{kwargs['mode']}-run-20261207_000000-{kwargs['id']}" / "files"
        files.mkdir(parents=True)
        fake = self
        return types.SimpleNamespace(dir=str(files), summary=fake.summary,
                                     log=lambda row, step: fake.logged.append((step, row)),
                                     finish=lambda: setattr(fake, "finished", True))


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """A real tiny run with logger=wandb, in a directory laid out like a Hydra sweep job, wandb faked."""
    from launcher.loop import train

    fake = FakeWandb()
    patch = pytest.MonkeyPatch()
    patch.setitem(sys.modules, "wandb", fake)
    patch.delenv("WANDB_API_KEY", raising=False)
    patch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path_factory.mktemp("sweep-lr") / "3"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    try:
        summary = train(to_config(compose_config([*SHORT, "logger=wandb", "logger.tags=[a,b]"])), run_dir)
    finally:
        patch.undo()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, summary, rows, fake


def test_every_row_has_the_documented_metrics(wandb_run):
    _, summary, rows, _ = wandb_run
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["mfu"] is None and row["mem_gib"] is None  # CPU: no peak FLOPs, no device memory
        assert row["tokens_per_s"] == row["tokens_per_s_per_device"] > 0
        assert min(row["data_s"], row["compute_s"], row["checkpoint_s"], row["eval_s"]) >= 0
    assert rows[1]["eval_perplexity"] == pytest.approx(torch.tensor(rows[1]["eval_loss"]).exp().item())
    assert "eval_loss" not in rows[0] and rows[1]["eval_s"] > 0
    assert rows[0]["eta_s"] > rows[1]["eta_s"] > rows[2]["eta_s"] == 0
    assert rows[-1]["tokens"] == summary["tokens"]
    assert summary["best_eval_loss"] == min(rows[1]["eval_loss"], summary["final_eval"]["eval_loss"])
    assert summary["final_eval"]["eval_perplexity"] > 1 and summary["skipped_steps"] == 0


def test_wandb_gets_config_group_rows_and_summary_offline(wandb_run, capsys):
    run_dir, summary, rows, fake = wandb_run
    init = fake.init_kwargs
    assert init["mode"] == "offline"  # no WANDB_API_KEY
    assert init["dir"] == str(run_dir) and init["group"] == run_dir.parent.name  # grouped by the sweep directory
    assert init["tags"] == ["a", "b"] and init["project"] == "slipstream"
    assert init["config"]["trainer"]["max_steps"] == 6 and init["config"]["logger"]["wandb"] is True
    assert (run_dir / "wandb" / "run_id").read_text() == init["id"]  # a resume logs into this run
    assert len(init["id"]) == 8
    assert [step for step, _ in fake.logged] == [2, 4, 6]
    assert fake.logged[1][1]["eval_loss"] == rows[1]["eval_loss"] and "mfu" not in fake.logged[0][1]  # nulls left out
    assert fake.summary["final_eval/eval_loss"] == summary["final_eval"]["eval_loss"] and fake.finished


def test_offline_wandb_prints_the_sync_command(tmp_path, monkeypatch, capsys):
    from launcher.loggers import Loggers

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    loggers = Loggers(to_config(compose_config(["logger=wandb"])), tmp_path, print)
    assert [b.name for b in loggers.backends] == ["metrics.jsonl", "wandb"]
    messages = [m for m in loggers.call("close") if m]
    run_id = (tmp_path / "wandb" / "run_id").read_text()
    offline_dir = tmp_path / "wandb" / f"offline-run-20261207_000000-{run_id}"
    assert messages == [f"wandb: logged offline; upload with: wandb sync {offline_dir}"]


def test_a_failing_logger_is_reported_once_and_switched_off(tmp_path):
    from launcher.loggers import Loggers

    class Broken:
        name = "broken"

        def log(self, row):
            raise ConnectionError("server went away")

    warnings = []
    loggers = Loggers(to_config(compose_config([])), tmp_path, warnings.append)
    loggers.backends.append(Broken())
    for step in (1, 2, 3):
        loggers.call("log", {"step": step, "loss": 1.0})
    assert warnings == ["warning: logger broken failed (ConnectionError: server went away); switched off, "
                        "training goes on"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # the others carry on


def test_a_logger_that_cannot_start_does_not_stop_the_run(tmp_path, monkeypatch):
    from launcher.loggers import Loggers

    fake = FakeWandb()
    fake.init = lambda **kwargs: (_ for _ in ()).throw(PermissionError("not logged in"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    warnings = []
    loggers = Loggers(to_config(compose_config(["logger=wandb"])), tmp_path, warnings.append)
    assert [b.name for b in loggers.backends] == ["metrics.jsonl"] and len(warnings) == 1


def test_missing_logger_packages_are_config_errors(monkeypatch):
    from launcher.loggers import check_installed

    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as if neither were installed
    for option, key in (("wandb", "logger.wandb=true"), ("tensorboard", "logger.tensorboard=true")):
        with pytest.raises(ValueError, match=f"{key}: {option} is not installed; pip install"):
            check_installed(to_config(compose_config([f"logger={option}"])).logger)


def test_wandb_mode_auto_needs_a_key_and_a_network(monkeypatch):
    from launcher import loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert loggers.wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    monkeypatch.setattr(loggers.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    assert loggers.wandb_mode("auto") == "offline"
    assert loggers.wandb_mode("online") == "online"


def test_flops_per_token_counts_matmul_weights_and_attention():
    from kernels.models import DecoderConfig, DecoderLM
    from launcher.flops import flops_per_token, matmul_parameters

    config = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = DecoderLM(config)
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64  # q, k+v (2 kv heads x 8), o, gate/up/down
    n = 2 * per_layer + 50 * 32  # + the (tied) LM head, once; the embedding lookup is no matmul
    assert matmul_parameters(model) == (n, 0)
    assert flops_per_token(model, seq_len=16) == 6 * n + 12 * 2 * 32 * 16
    for block in model.model.layers:  # frozen weights: forward and input gradient only
        block.self_attn.q_proj.weight.requires_grad_(False)
    assert flops_per_token(model, seq_len=16) == 6 * (n - 2 * 32 * 32) + 4 * 2 * 32 * 32 + 12 * 2 * 32 * 16


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                          ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 4090", 165.2),
                                          ("NVIDIA GeForce RTX 3090", 71.0), ("Tesla T4", 65.0),
                                          ("Some New GPU", None)])
def test_peak_table(name, tflops):
    from launcher.flops import peak_tflops

    assert peak_tflops(name) == tflops


def test_mfu_is_per_device_throughput_times_flops_over_peak():
    from launcher.flops import device_peak_flops
    from launcher.metrics import ThroughputWindow

    window = ThroughputWindow(torch.device("cpu"), world_size=8, flops_per_token=1e9, peak_flops=1e12,
                              total_steps=10, start_step=0)
    assert window.mfu(tokens_per_s=4000) == pytest.approx(0.5)  # 500 tokens/s per device x 1 GFLOP / 1 TFLOP/s
    window.add_step(torch.tensor(100))
    row, tokens = window.flush(done=1)
    assert tokens == 100 and row["tokens_per_s"] == pytest.approx(8 * row["tokens_per_s_per_device"])
    assert device_peak_flops(torch.device("cpu"), override_tflops=100) is None  # no MFU on the CPU


def test_tensorboard_backend_writes_scalars_per_step(tmp_path, monkeypatch):
    """TensorBoard is optional (not a test dependency): its writer is faked where torch imports it."""
    from launcher.loggers import Loggers

    scalars = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def add_text(self, key, text):
            scalars.append((key, text, None))

        def close(self):
            scalars.append(("closed", self.log_dir, None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    loggers = Loggers(to_config(compose_config(["logger=tensorboard"])), tmp_path, print)
    loggers.call("log", {"step": 3, "loss": 2.5, "mfu": None})
    loggers.call("close")
    assert scalars == [("loss", 2.5, 3), ("closed", str(tmp_path / "tensorboard"), None)]


def test_real_wandb_offline_run_holds_the_config_and_the_logged_metrics(tmp_path, monkeypatch):
    """The installed wandb, offline (no key): its run file under the run dir carries the config and every row."""
    wandb = pytest.importorskip("wandb")
    from launcher.loop import train

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(to_config(compose_config(["logger=wandb", "trainer.max_steps=3", "trainer.log_every=1",
                                    "trainer.export_hf=false", "data.max_eval_examples=8"])), tmp_path)
    # The run file is written by wandb's service process; at exit its teardown waits for it. A test
    # reads it while the process lives on: wait here (once, under two loaded cores, it held only its header).
    wandb.teardown()
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = run_file.read_bytes()  # protobuf records: keys and JSON-encoded values appear verbatim
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert b"global_batch_size" in recorded and b"tokens_per_s" in recorded
    for row in rows:
        assert json.dumps(row["loss"]).encode() in recorded, row["step"]
