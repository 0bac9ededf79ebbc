"""`launch report RUN [RUN ...] [--out DIR]`: one table row per run, and loss and tokens/s against step in a PNG.

A RUN is a run directory (it has metrics.jsonl) or a directory above run directories,
such as a Hydra sweep directory. A run still in progress (no summary.json yet) is
reported from its metrics so far. The table is printed and written as report.md next
to report.png, in --out, or else in the single directory given.
"""
from __future__ import annotations

import argparse
import json
import math
from itertools import takewhile
from pathlib import Path

COLUMNS = ("run", "steps", "tokens", "wall_s", "tokens/s", "mfu", "peak GiB", "final loss", "final eval", "best eval")


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for path in paths:
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
        elif path.is_dir():
            runs += sorted((p.parent for p in path.rglob("metrics.jsonl")), key=_natural)
        else:
            raise ValueError(f"{path}: no such directory")
    if not runs:
        raise ValueError(f"no metrics.jsonl under {', '.join(map(str, paths))}; pass run directories or a sweep "
                         f"directory")
    return runs


def _natural(path: Path) -> list:
    """Sweep jobs 0, 1, ..., 10 in numeric order."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def read_rows(run: Path) -> list[dict]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run being written: its last line may be half there
            continue
    return rows


def run_summary(run: Path, rows: list[dict], name: str) -> dict:
    """One table row: from summary.json when the run finished, else from its metrics so far."""
    summary_file = run / "summary.json"
    if summary_file.is_file():
        s = json.loads(summary_file.read_text())
        return {"run": name, "steps": s.get("steps"), "tokens": s.get("tokens"), "wall_s": s.get("wall_s"),
                "tokens/s": s.get("tokens_per_s"), "mfu": s.get("mfu"), "peak GiB": s.get("peak_alloc_gib"),
                "final loss": s.get("final_loss"), "final eval": (s.get("final_eval") or {}).get("eval_loss"),
                "best eval": s.get("best_eval_loss")}
    last = rows[-1] if rows else {}
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {"run": name + " (running)", "steps": last.get("step"), "tokens": last.get("tokens"),
            "wall_s": last.get("elapsed_s"), "tokens/s": last.get("tokens_per_s"), "mfu": last.get("mfu"),
            "peak GiB": last.get("peak_mem_gib"), "final loss": last.get("loss"),
            "final eval": evals[-1] if evals else None, "best eval": min(evals) if evals else None}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def table(summaries: list[dict]) -> str:
    """A Markdown table: readable in a terminal and renders on GitHub."""
    cells = [[_cell(s[c]) for c in COLUMNS] for s in summaries]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def plot(series: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display (clusters, CI)
    import matplotlib.pyplot as plt

    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in series.items():
        steps = [r["step"] for r in rows]
        loss_ax.plot(steps, [r["loss"] for r in rows], label=name)
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if evals:
            loss_ax.plot(*zip(*evals), "o--", markersize=3, label=f"{name} (eval)")
        speed_ax.plot(steps, [r.get("tokens_per_s") for r in rows], label=name)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    speed_ax.set(xlabel="step", ylabel="tokens/s (all devices)", title="throughput")
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def report(paths: list[Path], out: Path | None = None) -> tuple[str, Path]:
    """Writes report.md and report.png; returns (the table, the PNG's path)."""
    runs = find_runs(paths)
    if out is None:
        if len(paths) > 1:
            raise ValueError("several directories given: pass --out DIR for the report")
        out = paths[0]
    out.mkdir(parents=True, exist_ok=True)
    names = _names(runs)
    series = {name: read_rows(run) for name, run in zip(names, runs)}
    text = table([run_summary(run, series[name], name) for name, run in zip(names, runs)])
    (out / "report.md").write_text(text + "\n")
    png = out / "report.png"
    plot(series, png)
    return text, png


def _names(runs: list[Path]) -> list[str]:
    """Short unique names: the part of each path after what all of them share."""
    if len(runs) == 1:
        return [runs[0].name]
    shared = takewhile(lambda parts: len(set(parts)) == 1, zip(*(r.resolve().parts for r in runs)))
    common = Path(*[parts[0] for parts in shared])
    return [str(r.resolve().relative_to(common)) for r in runs]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="launch report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or sweep directories")
    parser.add_argument("--out", type=Path, help="where report.md and report.png go (default: the one RUN given)")
    args = parser.parse_args(argv)
    try:
        text, png = report(args.runs, args.out)
    except ImportError:
        raise SystemExit("launch report: error: matplotlib is not installed; "
                         "pip install 'slipstream[report]'") from None
    except ValueError as err:
        raise SystemExit(f"launch report: error: {err}") from None
    print(text)
    print(f"plot: {png}")
