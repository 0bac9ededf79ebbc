"""Longest context: how long one sequence an 8B LoRA / QLoRA run fits at micro batch 1.

Slipstream's real training step (bench_train.build_slipstream: the model core, its
Triton kernels, SingleDevice, launcher.loop.train_step) with activation checkpointing
offloaded to pinned host memory, as Unsloth's "unsloth" checkpointing does, and torch's
allocator configured as `launch` configures it (expandable segments). One child
process per mode builds the model once, then runs one full step (forward, backward,
AdamW) at doubling sequence lengths until a step runs out of memory or the next one
would not finish in the time left. Attention makes a step's time grow with the square
of the length (an 8B step at 128k tokens takes about a minute, at 256k four), so the
search stops where the budget does; the device memory measured at each length is then
fitted with a line (everything but the weights grows linearly: flash attention and the
chunked loss keep nothing quadratic) to say where the card would be full, and the
pinned host memory per token says where the host would be.

Each row: workload (8b-lora-longest / 8b-qlora-longest), longest_fitting_seq (the
longest length measured to fit), the per-length peaks and step times, and the two
predicted limits. Results: $OUT/longest_context.json.

usage: python benchmarks/longest_context.py [--modes lora,qlora] [--start 16384] [--budget-s 500]
       python benchmarks/longest_context.py --cap-gib 79.18   # an H100 80GB's memory on a larger card
       python benchmarks/longest_context.py --smoke      # tiny model on CPU, seconds
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_train import MODELS, REPO, Workload, _make_batch, build_slipstream  # noqa: E402
from launcher.spawn import default_allocator_config  # noqa: E402

GIB = 2**30


def _trial(step, vocab: int, seq: int, device) -> dict:
    """One training step on one sequence of `seq` tokens: its time and peaks, or the out-of-memory error."""
    import torch

    cuda = device.type == "cuda"
    ids, labels = _make_batch(vocab, 1, seq, device)
    pinned_before = 0
    if cuda:
        # The host cache retires the last trial's pinned blocks lazily, at its next allocation
        # after their copies are done, and counts them as allocated until then (on 2026-12-07
        # a trial after an out-of-memory one measured none of its own): retire them first.
        torch.cuda.synchronize()
        gc.collect()
        torch.empty(1, pin_memory=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.reset_peak_host_memory_stats()
        pinned_before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    started = time.perf_counter()
    try:
        loss = float(step([{"input_ids": ids, "labels": labels}]))
        trial = {"seq": seq, "fits": True, "step_s": time.perf_counter() - started, "loss": loss}
    except torch.OutOfMemoryError as error:
        trial = {"seq": seq, "fits": False, "error": str(error).split("\n")[0][:600]}
    finally:
        del ids, labels
    if cuda:
        trial.update(peak_alloc_gib=torch.cuda.max_memory_allocated() / GIB,
                     peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                     pinned_host_gib=(torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0) - pinned_before) / GIB)
    print("TRIAL " + json.dumps(trial), flush=True)
    return trial


def search(mode: str, model: str, start: int, max_seq: int, deadline: float, device, cap_gib: float | None,
           top_down: list[int] | None = None) -> dict:
    """Child: one step per length, from `start` doubling up to `max_seq` until one runs out of memory
    (a step that would overrun the deadline is not started); or the `top_down` lengths, longest
    first, until one fits (probing near the limit)."""
    import torch

    if cap_gib:  # a smaller card: the caching allocator refuses what lies beyond the cap
        torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / torch.cuda.get_device_properties(device).total_memory)

    kernels = "triton" if device.type == "cuda" else "torch"
    step, _, _, _, _ = build_slipstream(Workload(model, mode, 1, start, "offload"), device, kernels)
    vocab = MODELS[model]["vocab_size"]
    lengths = top_down or [start << k for k in range((max_seq // start).bit_length())]
    trials, outcome = [], f"every length tried: {', '.join(map(str, lengths))}"
    for seq in lengths:
        # Attention dominates long steps: the next one takes about 4x the last (2x the length).
        if trials and trials[-1]["fits"] and time.time() + 4.5 * trials[-1]["step_s"] > deadline:
            outcome = "stopped: the next length would overrun the time budget"
            break
        trials.append(_trial(step, vocab, seq, device))
        if trials[-1]["fits"] == bool(top_down):  # doubling ends at the first failure, top-down at the first fit
            outcome = f"{seq} tokens {'fit' if top_down else 'ran out of device memory'}"
            break
    fitting = [t for t in trials if t["fits"]]
    row = {"trials": trials, "outcome": outcome, "longest_fitting_seq": fitting[-1]["seq"] if fitting else None}
    if device.type == "cuda" and len(fitting) >= 2:
        total = cap_gib or torch.cuda.get_device_properties(device).total_memory / GIB
        per_token, intercept = statistics.linear_regression([t["seq"] for t in fitting],
                                                            [t["peak_alloc_gib"] for t in fitting])
        host_per_token = max(t["pinned_host_gib"] / t["seq"] for t in fitting)
        host_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        row.update({
            "device_total_gib": total, "peak_gib_at_0": intercept, "device_kib_per_token": per_token * 2**20,
            "predicted_device_limit_seq": int((total - intercept) / per_token),
            "host_total_gib": host_total, "pinned_host_kib_per_token": host_per_token * 2**20,
            "predicted_host_limit_seq": int(host_total / host_per_token) if host_per_token else None,
        })
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="qlora,lora")
    ap.add_argument("--start", type=int, default=16384)
    ap.add_argument("--max-seq", type=int, default=1 << 20)
    ap.add_argument("--top-down", help="comma-separated lengths, longest first: the first that fits ends the search")
    ap.add_argument("--cap-gib", type=float, help="device memory allowed (a smaller card's); default: all of it")
    ap.add_argument("--budget-s", type=float, default=500, help="for all modes together")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/longest_context_out")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = "tiny" if args.smoke else "8b"

    if args.one:
        import torch

        device = torch.device("cpu" if args.smoke else "cuda")
        print("RESULT " + json.dumps(search(args.one, model, args.start, args.max_seq, args.deadline, device, args.cap_gib,
                                             [int(n) for n in args.top_down.split(",")] if args.top_down else None)), flush=True)
        return

    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    env = dict(os.environ)
    default_allocator_config(env)  # as `launch` runs a job: expandable segments unless configured
    rows = []
    for index, mode in enumerate(modes):
        share = (args.budget_s - (time.time() - started)) / (len(modes) - index)
        cmd = [sys.executable, __file__, "--one", mode, "--start", str(64 if args.smoke else args.start),
               "--max-seq", str(512 if args.smoke else args.max_seq), "--deadline", str(time.time() + share)] + (["--smoke"] if args.smoke else [])
        cmd += ["--cap-gib", str(args.cap_gib)] if args.cap_gib else []
        cmd += ["--top-down", args.top_down] if args.top_down else []
        log = out / f"longest_context-{mode}.log"  # written as the child goes: a killed call keeps its trials
        with log.open("w") as sink:
            proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, timeout=share + 120, env=env)
        result = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
        if not result:
            print(f"FAILED {mode} rc={proc.returncode}\n{log.read_text()[-3000:]}", flush=True)
            continue
        import torch

        row = {"workload": f"{model}-{mode}-longest", "system": "slipstream",
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "micro_batch": 1,
               "activation_checkpointing": "offload", "device_memory_cap_gib": args.cap_gib,
               "allocator_config": env.get("PYTORCH_ALLOC_CONF") or env.get("PYTORCH_CUDA_ALLOC_CONF"),
               **json.loads(result[0][7:])}
        rows.append(row)
        (out / "longest_context.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "trials"}), flush=True)


if __name__ == "__main__":
    main()
