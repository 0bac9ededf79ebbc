"""Per-step metrics: metrics.jsonl (rank 0) and a progress bar (rank 0)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, progress_bar: bool):
        self.enabled = enabled
        self._file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        # Off a terminal (CI, Slurm logs) redraw rarely so the log stays readable.
        self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step",
                         mininterval=0.5 if sys.stderr.isatty() else 30.0,
                         disable=not (enabled and progress_bar))
        self.started = time.perf_counter()

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                              tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)

    def advance(self) -> None:
        self._bar.update(1)

    def write(self, message: str) -> None:
        """Print on rank 0 without breaking the progress bar."""
        if self.enabled:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
        if self._file:
            self._file.close()


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
