"""Strategies through `launch` as users run it: throughput on 1..N GPUs and loss parity.

Every job is `python -m launcher strategy=S cluster.nproc_per_node=N ...` (torchrun
started by the launcher when N > 1), in its own run directory; the numbers come from
the job's own metrics.jsonl (tokens/s: the median of the logged windows after the
first, which holds compilation and warm-up) and summary.json (rank 0's peak
torch.cuda.max_memory_allocated).

  throughput: 1B shapes (model=llama3_1b, random init), packed synthetic text, seq 2048,
              micro batch 4 per GPU, bf16 parameters, for each strategy and GPU count;
              weak-scaling efficiency = tokens/s at N / (N x tokens/s of the same strategy at 1).
  --parity:   the demo task on the 1B shapes, global batch 64, 20 steps: `single` on 1 GPU
              (accumulation 4) against every strategy on all GPUs; max loss difference.

On the device (repo root), with the bundle from `bash benchmarks/run_gpu.sh --build-bundle`
carried as .peers:

    python3 -m zipfile -e .peers/bench_bundle.zip /tmp/site && \
    PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 python3 benchmarks/strategies.py --gpus 1,2 --parity

Writes $OUT/strategies.json (rewritten after every job) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT", "/tmp/gpu_strategies_out"))
RUNS = Path("/tmp/gpu_strategies_runs")
# (row name, overrides); each strategy's own options come from its conf/strategy file
STRATEGIES = {
    "single": ["strategy=single"],
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    "fsdp_shard_grad_op": ["strategy=fsdp", "strategy.reshard_after_forward=false"],
    "hsdp": ["strategy=hsdp"],
    "zero1": ["strategy=zero1"],
    "zero2": ["strategy=zero2"],
    "zero3": ["strategy=zero3"],
    "zero3_offload": ["strategy=zero3_offload"],
}
MICRO, SEQ = 4, 2048


def synthetic_text(path: Path, n_docs: int = 2000) -> None:
    """Random documents of the bundled tokenizer's characters (one token each), packed to seq 2048."""
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz     "
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(rng.randint(500, 3000)))}) + "\n")


def text_job(data: Path, gpus: int, steps: int) -> list[str]:
    """Throughput job: 1B shapes on packed text, MICRO sequences per GPU per step (weak scaling)."""
    return ["model=llama3_1b", "data=text", f"data.path={data}", "data.packing=true", "data.eval_fraction=0",
            f"trainer.seq_len={SEQ}", f"trainer.micro_batch_size={MICRO}",
            f"trainer.global_batch_size={MICRO * gpus}", f"cluster.nproc_per_node={gpus}",
            f"trainer.max_steps={steps}", "trainer.log_every=2", "trainer.precision=bf16"]


# The same global batch on 1 GPU (accumulation 4) and on N GPUs: losses must agree.
PARITY_JOB = ["model=llama3_1b", "trainer.max_steps=20", "trainer.log_every=1", "trainer.global_batch_size=64",
              "trainer.micro_batch_size=16", "trainer.precision=bf16_autocast", "data.eval_exact_match=false",
              "data.max_eval_examples=64", "optim.lr=3e-4"]


def run(name: str, overrides: list[str], timeout: int) -> dict:
    run_dir = RUNS / name
    command = [sys.executable, "-m", "launcher", f"hydra.run.dir={run_dir}", "trainer.save_every=0",
               "trainer.export_hf=false", "trainer.resume=never", "logger.progress_bar=false", *overrides]
    started = time.time()
    row = {"name": name, "command": " ".join(command[1:])}
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "rc": None, "error": f"timed out after {timeout}s"}
    # the final 1B checkpoint (7-20 GB with optimizer states) would fill the 64 GB disk after a few jobs
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    (OUT / "logs" / f"{name}.log").write_text(" ".join(command) + "\n" + proc.stdout[-20000:] + proc.stderr[-20000:])
    row.update(rc=proc.returncode, wall_s=round(time.time() - started, 1))
    if proc.returncode != 0:
        return {**row, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    windows = [m["tokens_per_s"] for m in metrics[1:]] or [m["tokens_per_s"] for m in metrics]
    row.update(tokens_per_s=statistics.median(windows), tokens_per_s_windows=windows,
               peak_alloc_gib=summary.get("peak_alloc_gib"), final_loss=summary.get("final_loss"),
               losses={m["step"]: m["loss"] for m in metrics})
    return row


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated names of " + ", ".join(STRATEGIES))
    parser.add_argument("--gpus", default="1", help="comma-separated GPU counts for the throughput jobs")
    parser.add_argument("--parity", action="store_true", help="also the loss-parity jobs on all GPUs")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per job")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    data = RUNS / "text.jsonl"
    synthetic_text(data)
    names = args.strategies.split(",")
    all_gpus = torch.cuda.device_count()
    result = {"device": torch.cuda.get_device_name(), "gpus_on_machine": all_gpus, "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "throughput": [], "parity": []}

    def record(part: str, row: dict) -> None:
        result[part].append(row)
        (OUT / "strategies.json").write_text(json.dumps(result, indent=1))
        print(f"{part:10s} {row['name']:28s} rc={row['rc']} tokens/s {row.get('tokens_per_s') or 0:10,.0f} "
              f"peak {row.get('peak_alloc_gib') or 0:5.1f} GiB eff {row.get('weak_scaling_efficiency', float('nan')):.2f} "
              f"max|dloss| {row.get('max_abs_loss_diff', float('nan')):.4f} wall {row.get('wall_s', 0):6.1f}s "
              f"{row.get('error', '')}", flush=True)

    for gpus in map(int, args.gpus.split(",")):
        for name in names:
            if gpus > 1 and name == "single":
                continue
            row = run(f"{name}-{gpus}gpu", STRATEGIES[name] + text_job(data, gpus, args.steps), args.timeout)
            row["gpus"] = gpus
            one = next((r for r in result["throughput"] if r["name"] == f"{name}-1gpu" and r.get("tokens_per_s")), None)
            if gpus > 1 and one and row.get("tokens_per_s"):
                row["weak_scaling_efficiency"] = row["tokens_per_s"] / (gpus * one["tokens_per_s"])
            record("throughput", row)
    if args.parity:
        reference = run("parity-single-1gpu", STRATEGIES["single"] + PARITY_JOB, args.timeout)
        record("parity", reference)
        for name in (n for n in names if n != "single"):
            row = run(f"parity-{name}-{all_gpus}gpu", STRATEGIES[name] + PARITY_JOB +
                      [f"cluster.nproc_per_node={all_gpus}"], args.timeout)
            if row.get("losses") and reference.get("losses"):
                row["max_abs_loss_diff"] = max(abs(row["losses"][s] - reference["losses"][s])
                                               for s in reference["losses"] if s in row["losses"])
            record("parity", row)


if __name__ == "__main__":
    main()
