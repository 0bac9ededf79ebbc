"""The train loop: data -> forward/backward through the strategy -> step -> metrics -> checkpoint.

The loss of an optimizer step is the sum of per-token losses over all its
micro-batches and ranks divided by the number of target tokens in the whole step;
the count is all-reduced before any backward, so the gradient does not depend on
how the global batch is split.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from kernels.reference import IGNORE_INDEX
from launcher import auto_batch, evaluate, preemption
from launcher.batching import BatchPlan, scaled_lr
from launcher.config import Config
from launcher.data import GlobalBatchSampler, collate, load_splits, load_tokenizer
from launcher.flops import device_peak_flops, flops_per_token
from launcher.guards import NonFiniteGuard
from launcher.loggers import check_installed
from launcher.metrics import MetricsLog, ThroughputWindow, with_perplexity
from launcher.model_factory import build_model, resolved_peft
from launcher.precision import Precision
from launcher.topology import Topology
from strategies import build_strategy, checkpoint

log = logging.getLogger(__name__)


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
    # The loss before the step: a NaN/inf loss on any rank makes every rank skip the update.
    loss = strategy.all_reduce_sum(loss_sum) / global_targets.clamp(min=1)
    grad_norm = strategy.step(grad_clip, loss)
    return loss, grad_norm, global_tokens


@preemption.handles_preemption  # SIGTERM/SIGUSR1: checkpoint at the next step boundary, then return
def train(cfg: Config, run_dir: Path, topology: Topology | None = None) -> dict:
    """Run one training job into `run_dir`; returns the summary (also written to summary.json)."""
    topology = topology or Topology.from_env()
    check_installed(cfg.logger)  # on every rank, before anything starts
    if cfg.trainer.dry_run:
        from launcher.dry_run import dry_run

        return dry_run(cfg, show=topology.rank == 0)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = topology.device(cfg.trainer.device)
    precision = Precision.resolve(cfg.trainer.precision, device)
    lr = scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling, cfg.trainer.global_batch_size, cfg.optim.reference_batch_size)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
    train_set, eval_set = load_splits(cfg.data, tokenizer, cfg.trainer.seq_len, cfg.trainer.seed)
    cfg.peft = resolved_peft(cfg.peft, precision)  # before the stamp: checkpoints record the 4-bit storage dtype
    model = build_model(cfg.model, len(tokenizer), device, precision.param_dtype, cfg.trainer.seed, cfg.peft)
    checkpointing = cfg.trainer.activation_checkpointing
    model.set_activation_checkpointing("offload" if checkpointing == "auto" else checkpointing)  # auto: searched below
    model_flops_per_token = flops_per_token(model, cfg.trainer.seq_len)  # before sharding hides the shapes

    stamp = checkpoint.run_stamp(model.config, cfg)  # recorded in every checkpoint, checked on resume
    strategy = build_strategy(cfg, device)
    model_core, model = model, strategy.setup(model, lr)  # the core still says how many blocks recompute
    scheduler = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lr_lambda(cfg))
    sampler = GlobalBatchSampler(len(train_set), cfg.trainer.global_batch_size, cfg.trainer.seed)
    checkpoints = run_dir / "checkpoints"

    state = {"tokens": 0, "samples": 0}
    start_step = 0
    resume_from = checkpoint.select_resume(cfg.trainer.resume, checkpoints, stamp["identity"], strategy,
                                           cfg.trainer.verify_checkpoints)
    if resume_from:
        state = strategy.load_checkpoint(resume_from, scheduler)
        start_step = state.pop("step")
        scaler_state = state.pop("grad_scaler", None)
        if strategy.scaler and scaler_state:  # fp16: resume with the loss scale reached so far
            strategy.scaler.load_state_dict(scaler_state)
        log.info("resumed from %s at step %d", resume_from, start_step)
    if cfg.trainer.micro_batch_size == "auto":  # trial steps with the real model and optimizer, before training
        cfg.trainer.micro_batch_size = auto_batch.for_run(cfg, run_dir, model, strategy, precision.autocast,
                                                          topology.world_size)
    if checkpointing == "auto":  # the fewest checkpointed blocks that fit, at the micro batch just settled
        auto_batch.checkpointed_blocks_for_run(cfg, run_dir, model, strategy, precision.autocast, topology.world_size)
    plan = BatchPlan.resolve(cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, topology.world_size)

    if strategy.is_main:
        _print_start_table(cfg, plan, lr, topology, device, precision, strategy, train_set.describe(), len(eval_set),
                           _checkpointing_line(checkpointing, model_core))
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
        return with_perplexity(result)

    initial_eval = run_eval() if start_step == 0 else {}
    metrics = MetricsLog(cfg, run_dir, start_step, strategy.is_main)
    window = ThroughputWindow(device, topology.world_size, model_flops_per_token,
                              device_peak_flops(device, cfg.logger.peak_tflops), cfg.trainer.max_steps, start_step)
    guard = NonFiniteGuard(cfg.trainer.max_nonfinite_steps, strategy.scales_loss)
    preempted = preemption.PreemptionCheck(strategy)
    started = time.perf_counter()
    last_loss = float("nan")
    eval_losses = []
    last_checkpoint, stop_signal = resume_from, None  # this run's newest checkpoint; a preemption signal

    in_flight: list[checkpoint.PendingCheckpoint] = []  # trainer.async_checkpoint: at most one

    def settle() -> None:
        """Commit the checkpoint whose shards are still being written, if any (every rank)."""
        while in_flight:
            in_flight.pop().result()

    def save(step: int):
        settle()
        scaler = {"grad_scaler": strategy.scaler.state_dict()} if strategy.scaler else {}
        saved = strategy.save_checkpoint(checkpoints, step, scheduler, {**state, **stamp, **scaler},
                                         cfg.trainer.keep_last)
        if isinstance(saved, checkpoint.PendingCheckpoint):
            in_flight.append(saved)
            return saved.path
        return saved

    model.train()
    for step in range(start_step, cfg.trainer.max_steps):
        with window.timed("data_s"):
            micro_batches = [collate([train_set[i] for i in idx], pad_id)
                             for idx in sampler.micro_batches(step, topology.rank, topology.world_size,
                                                              plan.micro_batch_size)]
        loss, grad_norm, global_tokens = train_step(model, strategy, micro_batches, precision, pad_id,
                                                    cfg.trainer.grad_clip)
        guard.update(loss, grad_norm)
        step_lr = scheduler.get_last_lr()[0]
        scheduler.step()

        window.add_step(global_tokens)
        state["samples"] += plan.global_batch_size
        done = step + 1
        stop_signal = preempted()  # the same on every rank: all save this step, then stop
        saving = stop_signal or (cfg.trainer.save_every and done % cfg.trainer.save_every == 0
                                 and done < cfg.trainer.max_steps)
        evaluating = cfg.trainer.eval_every and done % cfg.trainer.eval_every == 0 and done < cfg.trainer.max_steps
        eval_result = {}
        if evaluating:
            with window.timed("eval_s"):
                eval_result = run_eval()
            eval_losses += [eval_result["eval_loss"]] if "eval_loss" in eval_result else []
            metrics.write(f"step {done}: " + _format_eval(eval_result))
        logging_step = done % cfg.trainer.log_every == 0 or done == cfg.trainer.max_steps
        stopping = False
        if logging_step or saving or evaluating:
            # The one host sync of the logging window (loss.item()); the window's numbers and the
            # guard's device-side counters are read after it.
            last_loss = loss.item()
            perf, new_tokens = window.flush(done)
            state["tokens"] += new_tokens
            metrics.log({"step": done, "loss": last_loss, "lr": step_lr, "grad_norm": float(grad_norm),
                         "tokens": state["tokens"], **perf, "skipped_steps": guard.skipped,
                         **({"overflow_steps": guard.overflows} if strategy.scales_loss else {}), **eval_result})
            stopping = guard.must_stop
        metrics.advance()
        if stopping:  # every rank decides alike; the bad state is not saved
            settle()
            metrics.close()
            raise guard.error(done, loss, grad_norm, last_checkpoint)
        if saving and guard.last_step_finite:
            with window.timed("checkpoint_s"):
                last_checkpoint = save(done)
        if stop_signal:
            log.warning("%s received: stopped after step %d, checkpoint committed; run again to resume",
                        stop_signal, done)
            break
    wall = time.perf_counter() - started

    final_step = done if stop_signal else max(start_step, cfg.trainer.max_steps)
    if guard.last_step_finite and (last_checkpoint is None or not last_checkpoint.name.endswith(f"{final_step:08d}")):
        last_checkpoint = save(final_step)
    final_eval = {} if stop_signal else run_eval()  # a preempted run has little time left
    settle()  # with trainer.async_checkpoint the final eval overlapped the last checkpoint's writes
    eval_losses += [final_eval["eval_loss"]] if "eval_loss" in final_eval else []
    export_dir = _export(strategy, tokenizer, run_dir) if cfg.trainer.export_hf and not stop_signal else None
    steps_run = final_step - start_step
    summary = {
        "steps": final_step, "preempted": stop_signal, "steps_this_run": steps_run, "tokens": state["tokens"], "wall_s": wall,
        "tokens_per_s": window.run_tokens / wall if steps_run and wall > 0 else None,
        "mfu": window.run_mfu(), "skipped_steps": guard.skipped,
        **({"overflow_steps": guard.overflows} if strategy.scales_loss else {}),
        "final_loss": last_loss if math.isfinite(last_loss) else None,
        "initial_eval": initial_eval, "final_eval": final_eval,
        "best_eval_loss": min(eval_losses) if eval_losses else None,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "export": str(export_dir) if export_dir else None,
        "peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    metrics.summary(summary)  # ends the progress bar; wandb/TensorBoard get the summary too
    if strategy.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        _print_summary(summary, run_dir)
    metrics.close()  # last: prints `wandb sync ...` for an offline run
    return summary


def _export(strategy, tokenizer, run_dir: Path) -> Path | None:
    """Every rank takes part in gathering the full weights; rank 0 writes them.

    A LoRA run also writes its peft adapter (run_dir/adapter); run_dir/hf then holds the merged model.
    """
    from kernels.models import save_pretrained
    from launcher import peft_export

    core = strategy.export_module()
    if not strategy.is_main:
        return None
    out = run_dir / "hf"
    if peft_export.has_adapters(core):
        peft_export.save_adapter(core, run_dir / "adapter")
        core = peft_export.merged(core)
    save_pretrained(core, out)
    tokenizer.save_pretrained(out)
    return out


def _format_eval(result: dict) -> str:
    parts = [f"eval loss {result['eval_loss']:.4f}"] if "eval_loss" in result else []
    if "eval_exact_match" in result:
        parts.append(f"exact match {result['eval_exact_match']:.1%}")
    return ", ".join(parts) or "no eval split"


def _print_start_table(cfg, plan, lr, topology, device, precision, strategy, train_desc, n_eval,
                       checkpointing: str) -> None:
    params, trainable = strategy.parameter_counts()
    rows = [
        ("model", f"{cfg.model.name} ({params / 1e6:.2f}M params, {trainable / 1e6:.2f}M trainable)"),
        ("strategy", cfg.strategy.name),
        ("device", f"{device} x {topology.world_size}, precision {cfg.trainer.precision} "
                   f"(params {str(precision.param_dtype).removeprefix('torch.')}"
                   f"{', autocast ' + str(precision.autocast_dtype).removeprefix('torch.') if precision.autocast_dtype else ''})"),
        ("world size", topology.world_size), ("micro batch", plan.micro_batch_size),
        ("checkpointing", checkpointing),
        ("accumulation", plan.accumulation_steps), ("global batch", plan.global_batch_size),
        ("tokens per step", f"<= {plan.global_batch_size * cfg.trainer.seq_len:,} (seq_len {cfg.trainer.seq_len})"),
        ("lr", f"{lr:.3g} ({cfg.optim.schedule}, warmup {cfg.optim.warmup_steps}, scaling {cfg.optim.lr_scaling})"),
        ("data", f"{cfg.data.name}: {train_desc}; {n_eval:,} eval examples"),
        ("steps", cfg.trainer.max_steps),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)


def _checkpointing_line(mode: str, core) -> str:
    blocks = f"{core.checkpointed_blocks} of {len(core.model.layers)} blocks recompute in backward"
    return {"none": "none", "full": blocks, "offload": f"{blocks}, their inputs in host memory",
            "auto": f"auto: {blocks}, their inputs in host memory"}[mode]


def _print_summary(summary: dict, run_dir: Path) -> None:
    lines = [f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_s']:.1f}s"
             + (f" ({summary['tokens_per_s']:,.0f} tokens/s)" if summary["tokens_per_s"] else "")]
    before, after = summary["initial_eval"], summary["final_eval"]
    if after:
        lines.append(f"held-out: {_format_eval(before)} -> {_format_eval(after)}" if before
                     else f"held-out: {_format_eval(after)}")
    extras = [f"MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else None,
              f"peak memory {summary['peak_alloc_gib']:.2f} GiB" if summary["peak_alloc_gib"] is not None else None,
              f"best eval loss {summary['best_eval_loss']:.4f}" if summary["best_eval_loss"] is not None else None,
              f"{summary['skipped_steps']} non-finite steps skipped" if summary["skipped_steps"] else None]
    if any(extras):
        lines.append(", ".join(filter(None, extras)))
    export = f"; export: {summary['export']}" if summary["export"] else ""
    lines.append(f"checkpoint: {summary['checkpoint']}{export}")
    lines.append(f"run dir: {run_dir}")
    print("\n".join(lines), flush=True)
