"""The train loop: data -> forward/backward through the strategy -> step -> metrics -> checkpoint.

The loss of an optimizer step is the sum of per-token losses over all its
micro-batches and ranks divided by the number of target tokens in the whole step;
the count is all-reduced before any backward, so the gradient does not depend on
how the global batch is split.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.reference import IGNORE_INDEX
from launcher import evaluate
from launcher.batching import BatchPlan, scaled_lr
from launcher.config import Config
from launcher.data import GlobalBatchSampler, collate, load_splits, load_tokenizer
from launcher.metrics import MetricsLog
from launcher.model_factory import build_model
from launcher.topology import Topology
from strategies import build_strategy, checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """How parameters are stored and how the forward computes."""

    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    device_type: str

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> Precision:
        if name == "auto":
            bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
            name = "bf16_autocast" if bf16_ok else "fp32"
        if name == "bf16":
            return cls(torch.bfloat16, None, device.type)
        if name == "bf16_autocast":
            return cls(torch.float32, torch.bfloat16, device.type)
        return cls(torch.float32, None, device.type)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine/linear decay to min_lr_ratio, or constant."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.optim.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.optim.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return 1.0

    return factor


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def train_step(model, strategy, micro_batches: list[dict], precision: Precision, pad_id: int,
               grad_clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches: (loss, grad norm, global non-pad tokens).

    The target count of the whole step, over all ranks, is known before the first
    backward, so every micro-batch's loss sum is divided by the same number. Results
    stay tensors: the caller syncs with the device only when it logs.
    """
    device = strategy.device
    local_targets = sum((b["labels"] != IGNORE_INDEX).sum() for b in micro_batches)
    local_tokens = sum((b["input_ids"] != pad_id).sum() for b in micro_batches)
    global_targets, global_tokens = strategy.all_reduce_sum(torch.stack([local_targets, local_tokens]))
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with strategy.accumulate(is_last=i == len(micro_batches) - 1):
            with precision.autocast():
                micro_loss_sum, _ = model(**batch)
            strategy.backward(micro_loss_sum, global_targets)
        loss_sum += micro_loss_sum.detach().float()
    grad_norm = strategy.step(grad_clip)
    loss = strategy.all_reduce_sum(loss_sum) / global_targets.clamp(min=1)
    return loss, grad_norm, global_tokens


def train(cfg: Config, run_dir: Path, topology: Topology | None = None) -> dict:
    """Run one training job into `run_dir`; returns the summary (also written to summary.json)."""
    topology = topology or Topology.from_env()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = topology.device(cfg.trainer.device)
    precision = Precision.resolve(cfg.trainer.precision, device)
    plan = BatchPlan.resolve(cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, topology.world_size)
    lr = scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling, plan.global_batch_size, cfg.optim.reference_batch_size)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
    train_set, eval_set = load_splits(cfg.data, tokenizer, cfg.trainer.seq_len, cfg.trainer.seed)
    model = build_model(cfg.model, len(tokenizer), device, precision.param_dtype, cfg.trainer.seed)
    model.enable_activation_checkpointing(cfg.trainer.activation_checkpointing == "full")

    strategy = build_strategy(cfg, device)
    model = strategy.setup(model, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lr_lambda(cfg))
    sampler = GlobalBatchSampler(len(train_set), plan.global_batch_size, cfg.trainer.seed)
    checkpoints = run_dir / "checkpoints"

    state = {"tokens": 0, "samples": 0}
    start_step = 0
    resume_from = _resume_path(cfg.trainer.resume, checkpoints)
    if resume_from:
        state = strategy.load_checkpoint(resume_from, scheduler)
        start_step = state.pop("step")
        log.info("resumed from %s at step %d", resume_from, start_step)

    if strategy.is_main:
        _print_start_table(cfg, plan, lr, topology, device, precision, strategy, train_set.describe(), len(eval_set))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run_eval() -> dict:
        if not eval_set:
            return {}
        core = strategy.unwrapped()
        result = {"eval_loss": evaluate.eval_loss(core, eval_set, plan.micro_batch_size * 4, pad_id, device,
                                                  precision.autocast)}
        if cfg.data.eval_exact_match:
            result["eval_exact_match"] = evaluate.exact_match(core, tokenizer, eval_set, 128, device,
                                                              precision.autocast)
        return result

    initial_eval = run_eval() if start_step == 0 else {}
    metrics = MetricsLog(run_dir, cfg.trainer.max_steps, start_step, strategy.is_main, cfg.logger.progress_bar)
    started = time.perf_counter()
    last_loss = float("nan")
    tokens_this_run = 0
    model.train()
    window_tokens, window_start = 0, started
    for step in range(start_step, cfg.trainer.max_steps):
        micro_batches = [collate([train_set[i] for i in idx], pad_id)
                         for idx in sampler.micro_batches(step, topology.rank, topology.world_size,
                                                          plan.micro_batch_size)]
        loss, grad_norm, global_tokens = train_step(model, strategy, micro_batches, precision, pad_id,
                                                    cfg.trainer.grad_clip)
        step_lr = scheduler.get_last_lr()[0]
        scheduler.step()

        window_tokens += global_tokens
        state["samples"] += plan.global_batch_size
        done = step + 1
        saving = cfg.trainer.save_every and done % cfg.trainer.save_every == 0 and done < cfg.trainer.max_steps
        if done % cfg.trainer.log_every == 0 or done == cfg.trainer.max_steps or saving:
            # The one host sync of the logging window; tokens/s is over the whole window.
            new_tokens, last_loss = int(window_tokens), loss.item()
            now = time.perf_counter()
            state["tokens"] += new_tokens
            tokens_this_run += new_tokens
            metrics.log({"step": done, "loss": last_loss, "lr": step_lr, "grad_norm": float(grad_norm),
                         "tokens": state["tokens"], "tokens_per_s": new_tokens / (now - window_start),
                         "elapsed_s": now - started})
            window_tokens, window_start = 0, now
        metrics.advance()
        if cfg.trainer.eval_every and done % cfg.trainer.eval_every == 0 and done < cfg.trainer.max_steps:
            metrics.write(f"step {done}: " + _format_eval(run_eval()))
        if saving:
            strategy.save_checkpoint(checkpoints, done, scheduler, state, cfg.trainer.keep_last)
    metrics.close()
    wall = time.perf_counter() - started

    final_step = max(start_step, cfg.trainer.max_steps)
    last_checkpoint = checkpoint.find_latest(checkpoints)
    if last_checkpoint is None or not last_checkpoint.name.endswith(f"{final_step:08d}"):
        last_checkpoint = strategy.save_checkpoint(checkpoints, final_step, scheduler, state, cfg.trainer.keep_last)
    final_eval = run_eval()
    export_dir = _export(strategy, tokenizer, run_dir) if cfg.trainer.export_hf else None
    steps_run = cfg.trainer.max_steps - start_step
    summary = {
        "steps": final_step, "steps_this_run": steps_run, "tokens": state["tokens"], "wall_s": wall,
        "tokens_per_s": tokens_this_run / wall if steps_run and wall > 0 else None,
        "final_loss": last_loss if math.isfinite(last_loss) else None,
        "initial_eval": initial_eval, "final_eval": final_eval,
        "checkpoint": str(last_checkpoint), "export": str(export_dir) if export_dir else None,
        "peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if strategy.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        _print_summary(summary, run_dir)
    return summary


def _resume_path(resume: str, checkpoints: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return checkpoint.find_latest(checkpoints)
    path = Path(resume)
    if not checkpoint.is_committed(path):
        raise ValueError(f"trainer.resume={resume}: not a committed checkpoint directory "
                         f"(expected {path}/{checkpoint.COMMIT_MARKER}); use auto, never or a checkpoints/step-N path")
    return path


def _export(strategy, tokenizer, run_dir: Path) -> Path | None:
    """Every rank takes part in gathering the full weights; rank 0 writes them."""
    from kernels.models import save_pretrained

    core = strategy.export_module()
    if not strategy.is_main:
        return None
    out = run_dir / "hf"
    save_pretrained(core, out)
    tokenizer.save_pretrained(out)
    return out


def _format_eval(result: dict) -> str:
    parts = [f"eval loss {result['eval_loss']:.4f}"] if "eval_loss" in result else []
    if "eval_exact_match" in result:
        parts.append(f"exact match {result['eval_exact_match']:.1%}")
    return ", ".join(parts) or "no eval split"


def _print_start_table(cfg, plan, lr, topology, device, precision, strategy, train_desc, n_eval) -> None:
    params, trainable = strategy.parameter_counts()
    rows = [
        ("model", f"{cfg.model.name} ({params / 1e6:.2f}M params, {trainable / 1e6:.2f}M trainable)"),
        ("strategy", cfg.strategy.name),
        ("device", f"{device} x {topology.world_size}, precision {cfg.trainer.precision} "
                   f"(params {str(precision.param_dtype).removeprefix('torch.')}"
                   f"{', autocast ' + str(precision.autocast_dtype).removeprefix('torch.') if precision.autocast_dtype else ''})"),
        ("world size", topology.world_size), ("micro batch", plan.micro_batch_size),
        ("accumulation", plan.accumulation_steps), ("global batch", plan.global_batch_size),
        ("tokens per step", f"<= {plan.global_batch_size * cfg.trainer.seq_len:,} (seq_len {cfg.trainer.seq_len})"),
        ("lr", f"{lr:.3g} ({cfg.optim.schedule}, warmup {cfg.optim.warmup_steps}, scaling {cfg.optim.lr_scaling})"),
        ("data", f"{cfg.data.name}: {train_desc}; {n_eval:,} eval examples"),
        ("steps", cfg.trainer.max_steps),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)


def _print_summary(summary: dict, run_dir: Path) -> None:
    lines = [f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_s']:.1f}s"
             + (f" ({summary['tokens_per_s']:,.0f} tokens/s)" if summary["tokens_per_s"] else "")]
    before, after = summary["initial_eval"], summary["final_eval"]
    if after:
        lines.append(f"held-out: {_format_eval(before)} -> {_format_eval(after)}" if before
                     else f"held-out: {_format_eval(after)}")
    lines.append(f"run dir: {run_dir}")
    print("\n".join(lines), flush=True)
