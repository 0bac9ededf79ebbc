"""Per-step metrics: what a logged row holds, and where it goes (rank 0 only).

A row (metrics.jsonl, wandb, TensorBoard) is written every trainer.log_every steps,
at every save and eval, and at the last step:

- step, loss, lr, grad_norm, tokens (non-padding input tokens so far, all ranks)
- tokens_per_s (all ranks) and tokens_per_s_per_device, over the time spent in
  training steps since the last row (evaluation and checkpoint time left out)
- mfu: model FLOPs utilisation (launcher/flops.py); null on the CPU or an unknown GPU
- mem_gib, peak_mem_gib: allocated device memory now and the run's peak; null on the CPU
- data_s, compute_s, checkpoint_s, eval_s: mean seconds per step since the last row.
  data_s is host time spent building batches; compute_s (forward, backward, optimizer)
  is the rest of the window, measured at the row's one host sync, so no extra
  synchronisation happens between rows
- eta_s: remaining steps x this run's mean step time; skipped_steps: non-finite
  steps skipped so far (launcher/guards.py); eval_loss and eval_perplexity when an
  evaluation ran at that step.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from launcher.config import Config
from launcher.loggers import Loggers


class MetricsLog:
    def __init__(self, cfg: Config, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        # Off a terminal (CI, Slurm logs) redraw rarely so the log stays readable.
        self._bar = tqdm(total=cfg.trainer.max_steps, initial=start_step, dynamic_ncols=True, unit="step",
                         mininterval=0.5 if sys.stderr.isatty() else 30.0,
                         disable=not (enabled and cfg.logger.progress_bar))
        self._loggers = Loggers(cfg, run_dir, self.write) if enabled else None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._loggers.call("log", row)
        self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                              tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)

    def advance(self) -> None:
        self._bar.update(1)

    def write(self, message: str) -> None:
        """Print on rank 0 without breaking the progress bar."""
        if self.enabled:
            self._bar.write(message)

    def summary(self, summary: dict) -> None:
        self._bar.close()
        if self.enabled:
            self._loggers.call("summary", summary)

    def close(self) -> None:
        """Flush and finish every backend; prints what a backend has to say (the `wandb sync` command)."""
        self._bar.close()
        if self.enabled:
            for message in filter(None, self._loggers.call("close")):
                print(message, flush=True)
            self._loggers.backends.clear()


class ThroughputWindow:
    """Tokens and the host-side time split between two logged rows.

    Token counts stay device tensors until `flush`, which runs right after the row's
    host sync (loss.item()), so reading them costs nothing extra.
    """

    PARTS = ("data_s", "checkpoint_s", "eval_s")

    def __init__(self, device: torch.device, world_size: int, flops_per_token: float, peak_flops: float | None,
                 total_steps: int, start_step: int):
        self.device, self.world_size = device, world_size
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.perf_counter()
        self.train_s = 0.0  # over the whole run: time in training steps, for the summary's MFU
        self.run_tokens = 0
        self._reset(self.started)

    def _reset(self, now: float) -> None:
        self._start, self._steps, self._tokens = now, 0, 0
        self._parts = dict.fromkeys(self.PARTS, 0.0)

    @contextlib.contextmanager
    def timed(self, part: str):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._parts[part] += time.perf_counter() - begin

    def add_step(self, tokens: torch.Tensor) -> None:
        self._steps += 1
        self._tokens += tokens

    def flush(self, done: int) -> tuple[dict, int]:
        """(the row's throughput, time split, memory and ETA; the window's tokens), after the host sync.

        Starts a new window.
        """
        now = time.perf_counter()
        tokens, steps = int(self._tokens), max(1, self._steps)
        window_s = now - self._start
        compute_s = max(0.0, window_s - sum(self._parts.values()))
        train_s = compute_s + self._parts["data_s"]
        self.train_s += train_s
        self.run_tokens += tokens
        tokens_per_s = tokens / train_s if train_s > 0 else 0.0
        per_step_run = (now - self.started) / max(1, done - self.start_step)
        row = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.world_size,
            "mfu": self.mfu(tokens_per_s),
            **memory_gib(self.device),
            "data_s": self._parts["data_s"] / steps, "compute_s": compute_s / steps,
            "checkpoint_s": self._parts["checkpoint_s"] / steps, "eval_s": self._parts["eval_s"] / steps,
            "eta_s": (self.total_steps - done) * per_step_run,
            "elapsed_s": now - self.started,
        }
        self._reset(now)
        return row, tokens

    def mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak_flops:
            return None
        return tokens_per_s / self.world_size * self.flops_per_token / self.peak_flops

    def run_mfu(self) -> float | None:
        """MFU over all training steps of this run (evaluation and checkpoints left out)."""
        return self.mfu(self.run_tokens / self.train_s) if self.train_s > 0 else None


def memory_gib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"mem_gib": None, "peak_mem_gib": None}
    return {"mem_gib": torch.cuda.memory_allocated(device) / 2**30,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def with_perplexity(result: dict) -> dict:
    """An eval result with eval_perplexity = exp(eval_loss) (null when it overflows)."""
    if "eval_loss" not in result:
        return result
    loss = result["eval_loss"]
    return {**result, "eval_perplexity": math.exp(loss) if loss < 700 else None}
