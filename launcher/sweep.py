"""The end of a `launch -m` sweep: one table of every job's overrides, batch, final loss and tokens/s.

A Hydra callback (registered under hydra.callbacks in conf/config.yaml). It reads
what the jobs left on disk, not what they returned, so it works the same whether
the jobs ran here one after another or elsewhere (the submitit Slurm launcher).
"""
from __future__ import annotations

import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SUMMARY_FILE = "sweep_summary.json"


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = [job_row(job_dir) for job_dir in job_dirs(sweep_dir)]
        if not rows:
            return
        (sweep_dir / SUMMARY_FILE).write_text(json.dumps(rows, indent=1))
        print(format_table(rows), flush=True)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job's run directory (hydra.sweep.subdir may nest them), in job order."""
    found = [marker.parent.parent for marker in sweep_dir.rglob(".hydra/hydra.yaml")]
    return sorted(found, key=lambda job: OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job.num)


def job_row(job_dir: Path) -> dict:
    overrides = list(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
    config = OmegaConf.load(job_dir / "config.yaml") if (job_dir / "config.yaml").is_file() else None
    summary_file = job_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    cluster = config.cluster if config else None
    return {
        "run_dir": str(job_dir), "overrides": overrides,
        "world_size": cluster.nproc_per_node * cluster.nnodes if cluster else None,
        "global_batch_size": config.trainer.global_batch_size if config else None,
        "final_loss": summary.get("final_loss"), "tokens_per_s": summary.get("tokens_per_s"),
        "finished": bool(summary) and not summary.get("preempted", False),
    }


def format_table(rows: list[dict]) -> str:
    # Overrides every job shares say nothing about the differences: show them once, above.
    shared = set.intersection(*(set(row["overrides"]) for row in rows))
    header = ("job overrides", "world", "global batch", "final loss", "tokens/s", "run dir")
    lines = [[" ".join(o for o in row["overrides"] if o not in shared) or "-", _text(row["world_size"]),
              _text(row["global_batch_size"]), _text(row["final_loss"], "{:.4f}"),
              _text(row["tokens_per_s"], "{:,.0f}"), row["run_dir"]] for row in rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    title = f"sweep: {len(rows)} job{'s' * (len(rows) != 1)}"
    out = [title + (f"; every job: {' '.join(sorted(shared))}" if shared else "")]
    out += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *lines]]
    return "\n".join(out)


def _text(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)
