"""Every strategy follows the single-process trajectory; accumulation does not sync; `launch` spawns torchrun.

A fixed global batch of 8 variable-length, padded sequences per step, factored as
1 process x micro 2 x accumulation 4 (the reference), 2 ranks x micro 2 x
accumulation 2 (DDP, FSDP full shard / shard-grad-op, ZeRO-1/2/3) or 4 ranks x micro 1
x accumulation 2 (HSDP, 2 copies x 2 shards), must give the same losses, gradient
norms, held-out loss, logits and final (exported) weights: fp32 on CPU, gloo, real
processes under torchrun. The same worker counts the gradient collectives of every
micro-batch and round-trips the strategy's own checkpoint.

This file is also the worker: `torchrun ... tests/test_strategies.py '<json spec>'`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
STEPS = 6
RESUME_AT = 3  # each distributed run also saves here, and at the end loads it and replays the steps after it
GLOBAL_BATCH = 8
N_EXAMPLES = 24
VOCAB = 50
PAD = 0
# Names of the torch.distributed calls that move gradients (DDP's C++ reducer is counted by a comm hook).
GRAD_COLLECTIVES = ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter",
                    "all_reduce_coalesced", "reduce_scatter_coalesced")


# ----------------------------------------------------------------------------- worker side

def make_examples():
    from kernels.reference import IGNORE_INDEX
    from launcher.data import Example

    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(N_EXAMPLES):
        length = int(torch.randint(3, 28, (1,), generator=gen))  # very different target counts per micro-batch
        ids = torch.randint(1, VOCAB, (length + 1,), generator=gen).tolist()
        prompt_len = length // 3
        labels = [IGNORE_INDEX] * max(prompt_len - 1, 0) + ids[max(prompt_len, 1):]
        examples.append(Example("", "", ids[:-1], labels, prompt_len))
    return examples


def make_config(spec: dict):
    from launcher.config import Config, OptimConfig, StrategyConfig, TrainerConfig

    return Config(strategy=StrategyConfig(**spec.get("strategy", {})),
                  trainer=TrainerConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=spec["micro"],
                                        precision=spec.get("precision", "fp32"), grad_clip=spec.get("grad_clip", 0.5),
                                        device="cpu",
                                        max_steps=STEPS),
                  optim=OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, schedule="cosine"))


class CollectiveCounter:
    """Counts gradient collectives: torch.distributed calls (FSDP2, DeepSpeed) and a DDP comm hook."""

    def __init__(self):
        import torch.distributed as dist

        self.count = 0
        self.per_micro: list[list[int]] = []  # per optimizer step, collectives during each micro-batch's backward
        for name in GRAD_COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._counted(original))

    def _counted(self, fn):
        def wrapper(*args, **kwargs):
            self.count += 1
            return fn(*args, **kwargs)

        return wrapper

    def ddp_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.count += 1
        return allreduce_hook(None, bucket)

    def watch(self, strategy, micro_per_step: int) -> None:
        backward = strategy.backward

        def counted_backward(*args):
            before = self.count
            backward(*args)
            if not self.per_micro or len(self.per_micro[-1]) == micro_per_step:
                self.per_micro.append([])
            self.per_micro[-1].append(self.count - before)

        strategy.backward = counted_backward


def worker(spec: dict) -> dict:
    """Train STEPS optimizer steps with the real train_step; returns losses, norms, syncs, final weights."""
    import contextlib

    from kernels.models import DecoderConfig, DecoderLM
    from launcher import evaluate
    from launcher.data import GlobalBatchSampler, collate
    from launcher.loop import Precision, lr_lambda, train_step
    from strategies import build_strategy

    torch.set_num_threads(1)
    cfg = make_config(spec)
    device = torch.device("cpu")
    counter = CollectiveCounter()
    strategy = build_strategy(cfg, device)
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
                                    tie_word_embeddings=True))
    for name, param in model.named_parameters():
        if spec.get("freeze") and any(part in name for part in spec["freeze"]):
            param.requires_grad_(False)
    model.set_activation_checkpointing(spec.get("checkpointing", "none"))
    model = strategy.setup(model, lr=cfg.optim.lr)
    if cfg.strategy.name == "ddp":
        strategy.ddp.register_comm_hook(None, counter.ddp_hook)
    if spec.get("sync_every_micro_batch"):  # negative control: what a broken strategy would do
        strategy.accumulate = lambda is_last: contextlib.nullcontext()
    scheduler = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lr_lambda(cfg))
    examples = make_examples()
    sampler = GlobalBatchSampler(len(examples), GLOBAL_BATCH, seed=0)
    accumulation = GLOBAL_BATCH // (spec["micro"] * strategy.world_size)
    counter.watch(strategy, accumulation)
    precision = Precision.resolve(cfg.trainer.precision, device)
    checkpoints = Path(spec["out"]).parent / "checkpoints" if "out" in spec else None

    def run_steps(steps: range) -> tuple[list[float], list[float]]:
        losses, norms = [], []
        for step in steps:
            micro_batches = [collate([examples[i] for i in idx], PAD) for idx in
                             sampler.micro_batches(step, strategy.rank, strategy.world_size, spec["micro"])]
            assert len(micro_batches) == accumulation
            loss, grad_norm, _ = train_step(model, strategy, micro_batches, precision, PAD, cfg.trainer.grad_clip)
            scheduler.step()
            losses.append(float(loss))
            norms.append(float(grad_norm))
            if checkpoints and step + 1 == RESUME_AT:
                strategy.save_checkpoint(checkpoints, step + 1, scheduler, {"tokens": 0}, keep_last=2)
        return losses, norms

    losses, norms = run_steps(range(STEPS))
    # what evaluation uses, on every rank together: forward and logits of the (possibly sharded) model
    view = strategy.unwrapped()
    held_out = evaluate.eval_loss(view, examples[:8], 4, PAD, device, precision.autocast)
    with torch.no_grad(), precision.autocast():
        logits = view.logits(torch.tensor([examples[0].input_ids]))[0, -1].float().clone()
    core = strategy.export_module()
    result = {"losses": losses, "grad_norms": norms, "syncs": list(counter.per_micro),
              "world_size": strategy.world_size, "eval_loss": held_out, "logits": logits}
    if strategy.is_main:
        result["state"] = {k: v.detach().float().cpu().clone() for k, v in core.state_dict().items()}
    if checkpoints:  # the strategy's own checkpoint round trip: back to RESUME_AT, replay the rest
        strategy.load_checkpoint(checkpoints / f"step-{RESUME_AT:08d}", scheduler)
        result["replayed"], _ = run_steps(range(RESUME_AT, STEPS))
    return result


def worker_main(spec_json: str) -> None:
    from strategies.distributed import shutdown

    spec = json.loads(spec_json)
    result = worker(spec)
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(result, spec["out"])
    shutdown()


# ----------------------------------------------------------------------------- test side

def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
                DS_ACCELERATOR="cpu")


def run_distributed(tmp_path: Path, nproc: int = 2, **spec) -> dict:
    """Runs `worker(spec)` on `nproc` ranks under torchrun; returns rank 0's result."""
    spec["out"] = str(tmp_path / "result.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, json.dumps(spec)]
    result = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(spec["out"], weights_only=False)


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, micro 2 x accumulation 4, in this process (no process group)."""
    return worker({"strategy": {"name": "single"}, "micro": 2})


@pytest.fixture(scope="module")
def reference_frozen() -> dict:
    return worker({"strategy": {"name": "single"}, "micro": 2, "freeze": FROZEN})


FROZEN = ["embed_tokens", "q_proj"]  # tied embeddings + every q_proj: frozen and trainable in one FSDP group

CASES = {
    "ddp": {"strategy": {"name": "ddp"}},
    "fsdp": {"strategy": {"name": "fsdp"}},
    "fsdp_shard_grad_op": {"strategy": {"name": "fsdp", "reshard_after_forward": False}},
    # 2 copies x 2 shards: 4 ranks x micro 1 x accumulation 2
    "hsdp": {"strategy": {"name": "hsdp", "replicate_degree": 2}, "nproc": 4, "micro": 1},
    "zero1": {"strategy": {"name": "zero1", "zero_stage": 1}},
    "zero2": {"strategy": {"name": "zero2", "zero_stage": 2}},
    "zero3": {"strategy": {"name": "zero3", "zero_stage": 3}},
    # recomputed blocks whose inputs wait in host memory, under sharded parameters
    "fsdp_offloaded_checkpoints": {"strategy": {"name": "fsdp"}, "checkpointing": "offload"},
    "zero3_offloaded_checkpoints": {"strategy": {"name": "zero3", "zero_stage": 3}, "checkpointing": "offload"},
}


def assert_same_trajectory(result: dict, ref: dict, world_size: int = 2) -> None:
    assert result["world_size"] == world_size
    assert result["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert result["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    assert result["losses"][-1] < result["losses"][0]
    assert result["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    torch.testing.assert_close(result["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    assert result["state"].keys() == ref["state"].keys()
    for name, tensor in result["state"].items():
        torch.testing.assert_close(tensor, ref["state"][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_strategy_follows_the_single_process_trajectory(case, reference, tmp_path):
    spec = {"micro": 2, "nproc": 2, **CASES[case]}
    result = run_distributed(tmp_path, **spec)
    assert_same_trajectory(result, reference, spec["nproc"])
    assert result["replayed"] == pytest.approx(result["losses"][RESUME_AT:], rel=1e-6)  # save/load round trip
    if case in ("ddp", "fsdp", "fsdp_shard_grad_op", "hsdp", "zero1"):
        # accumulation without communication: nothing moves until the last micro-batch of each step
        assert len(result["syncs"]) == STEPS
        for step in result["syncs"]:
            assert step[0] == 0 and step[-1] > 0, result["syncs"]


def test_fsdp_under_bf16_autocast_computes_what_one_process_computes(tmp_path):
    """The residual stream stays fp32 and the root (embeddings, LM head) keeps its dtype under FSDP2,
    as autocast leaves them in one process: the first step's loss is the same but for the order of the
    ranks' sums (FSDP2's default policy, which casts everything to bf16: 3e-6 off), and the rest differ only by the blocks' norm weights rounding to bf16 in the gather (bound: 2e-4 relative;
    FSDP2's default policy, which casts everything to bf16, was 4e-4 off by the fourth step)."""
    single = worker({"strategy": {"name": "single"}, "micro": 2, "precision": "bf16_autocast"})
    fsdp = run_distributed(tmp_path, micro=2, precision="bf16_autocast", strategy={"name": "fsdp"})
    assert fsdp["losses"][0] == pytest.approx(single["losses"][0], rel=1e-6)
    assert fsdp["losses"] == pytest.approx(single["losses"], rel=2e-4)
    assert fsdp["eval_loss"] == pytest.approx(single["eval_loss"], rel=2e-4)


@pytest.mark.parametrize("name", ["fsdp", "ddp"])
def test_frozen_and_trainable_parameters_mix(name, reference_frozen, tmp_path):
    result = run_distributed(tmp_path, micro=2, strategy={"name": name}, freeze=FROZEN)
    assert_same_trajectory(result, reference_frozen)
    torch.testing.assert_close(result["state"]["model.embed_tokens.weight"],
                               reference_frozen["state"]["model.embed_tokens.weight"], rtol=0, atol=0)


def test_sync_counter_catches_a_sync_on_every_micro_batch(tmp_path):
    """Negative control: the counter above would fail a strategy that syncs during accumulation."""
    result = run_distributed(tmp_path, micro=2, strategy={"name": "fsdp"}, sync_every_micro_batch=True)
    assert all(step[0] > 0 for step in result["syncs"])


# ----------------------------------------------------------------------------- validation before anything starts

@pytest.mark.parametrize("overrides,expected", [
    (["strategy=single", "cluster.nproc_per_node=2"], "strategy=single: runs one process"),
    (["strategy=ddp", "strategy.zero_stage=2"], "strategy.zero_stage: only the DeepSpeed strategies"),
    (["strategy=zero2", "strategy.offload_params=true"], "strategy.offload_params: needs ZeRO stage 3"),
    (["strategy=ddp", "strategy.reshard_after_forward=false"], "strategy.reshard_after_forward: only fsdp/hsdp"),
    (["strategy=hsdp", "cluster.nproc_per_node=4", "strategy.replicate_degree=3"], "strategy.replicate_degree=3"),
    (["strategy=ddp", "cluster.nproc_per_node=3"], "nearest valid global_batch_size"),
    (["strategy=zero3_offload", "trainer.device=cpu"], "strategy.offload_optimizer=true: offloading moves GPU"),
    (["cluster.nproc_per_node=0"], "cluster.nproc_per_node: must be >= 1"),
    (["strategy=ddp", "cluster.nnodes=2"], "cluster.rdzv_endpoint: required with cluster.nnodes=2"),
])
def test_bad_strategy_config_fails_in_one_line(overrides, expected):
    from launcher.compose import ConfigError, validate

    with pytest.raises(ConfigError) as err:
        validate(overrides, multirun=False)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_more_ranks_than_gpus_fails_before_starting(monkeypatch):
    from launcher.compose import ConfigError, check_machine, compose_config, to_config

    config = to_config(compose_config(["strategy=fsdp", "cluster.nproc_per_node=8", "trainer.micro_batch_size=8"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"cluster.nproc_per_node=8: only 2 GPU\(s\) visible"):
        check_machine(config, launching=True)
    config.trainer.device = "cpu"  # gloo: any small number of CPU processes
    check_machine(config, launching=True)


def test_deepspeed_config_comes_from_the_hydra_config(tmp_path):
    from launcher.batching import BatchPlan
    from launcher.compose import ConfigError, compose_config, to_config
    from strategies.zero import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": 1000},
                                "gradient_clipping": 0.3}))
    config = to_config(compose_config(["strategy=zero3", "cluster.nproc_per_node=2", "trainer.global_batch_size=64",
                                       "trainer.micro_batch_size=8", f"strategy.deepspeed_config={user}"]))
    ds = deepspeed_config(config, BatchPlan.resolve(64, 8, 2), 1e-3, half=torch.bfloat16, device_type="cuda")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 4)
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}  # merged, not replaced
    assert ds["gradient_clipping"] == 0.3 and ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["type"] == "AdamW"

    for contradiction, key in (({"train_micro_batch_size_per_gpu": 4}, "trainer.micro_batch_size"),
                               ({"gradient_accumulation_steps": 2}, "trainer.global_batch_size"),
                               ({"zero_optimization": {"stage": 2}}, "strategy.zero_stage")):
        user.write_text(json.dumps(contradiction))
        with pytest.raises(ConfigError, match=f"contradicts {key}"):
            to_config(compose_config(["strategy=zero3", "cluster.nproc_per_node=2", "trainer.global_batch_size=64",
                                      "trainer.micro_batch_size=8", f"strategy.deepspeed_config={user}"]))


def test_contradicting_deepspeed_json_stops_launch_before_the_run_dir(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": 1024}))
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "launcher", "strategy=zero2", "cluster.nproc_per_node=2",
                             f"strategy.deepspeed_config={user}", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"launch: error: strategy.deepspeed_config={user}: train_batch_size=1024 contradicts "
        f"trainer.global_batch_size (which gives 64: global batch in sequences); remove it from the JSON or "
        f"change trainer.global_batch_size"]
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- launch end to end

def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def signal_after_rows(process: subprocess.Popen, run_dir: Path, rows: int, timeout: float) -> str:
    """Once `process` has logged `rows` metrics rows into run_dir, send it SIGUSR1; returns its output."""
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= rows):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-4000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    return process.communicate(timeout=timeout)[0]


def launch(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "trainer.max_steps=3", "trainer.log_every=1",
                           "data.max_eval_examples=8", "logger.progress_bar=false", f"hydra.run.dir={run_dir}",
                           *overrides], cwd=run_dir.parent, env=env(), capture_output=True, text=True, timeout=240)


def test_launch_spawns_torchrun_and_matches_one_process(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    result = launch(ddp_dir, "strategy=ddp", "cluster.nproc_per_node=2", "trainer.precision=fp32")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = metrics(ddp_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone writes
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and (ddp_dir / "hf" / "config.json").is_file()
    assert (ddp_dir / "config.yaml").is_file() and not list(ddp_dir.glob("*/metrics.jsonl"))

    # the demo's global batch of 64: 2 ranks x micro 32 x accumulation 1 against 1 x 32 x 2
    result = launch(single_dir, "trainer.precision=fp32")
    assert result.returncode == 0, result.stderr[-6000:]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in metrics(single_dir)], rel=1e-5)
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in metrics(single_dir)]


def test_launch_exit_code_is_torchruns(tmp_path):
    run_dir = tmp_path / "run"
    result = launch(run_dir, "strategy=ddp", "cluster.nproc_per_node=2", "trainer.resume=/nonexistent/step-1")
    assert result.returncode != 0
    assert "trainer.resume=/nonexistent/step-1" in result.stderr, result.stderr


if __name__ == "__main__":
    worker_main(sys.argv[1])
