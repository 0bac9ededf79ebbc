"""Logger backends on rank 0: metrics.jsonl (always), Weights & Biases and TensorBoard (chosen by `logger=`).

A backend that raises is reported in one warning line and switched off: no logger
can end a run. A backend that is configured but not installed is a config error,
raised on every rank before training starts.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import secrets
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from omegaconf import OmegaConf

from launcher.config import Config, LoggerConfig


def check_installed(cfg: LoggerConfig) -> None:
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("logger.wandb=true: wandb is not installed; pip install 'slipstream[wandb]' (or wandb), "
                         "or use logger=console")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("logger.tensorboard=true: tensorboard is not installed; pip install tensorboard, "
                         "or use logger=console")


class JsonlLogger:
    name = "metrics.jsonl"

    def __init__(self, run_dir: Path):
        self._file = open(run_dir / "metrics.jsonl", "a")

    def log(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a crash or a `launch report` mid-run sees every row so far

    def summary(self, summary: dict) -> None:
        pass  # summary.json is written by the loop

    def close(self) -> str | None:
        self._file.close()
        return None


class WandbLogger:
    name = "wandb"

    def __init__(self, cfg: Config, run_dir: Path):
        import wandb

        options = cfg.logger
        # One wandb run per run directory: a resumed job logs into the run it started.
        id_file = run_dir / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # wandb-style 8 chars
        id_file.write_text(run_id)
        self.mode = wandb_mode(options.mode)
        self.run = wandb.init(project=options.project, entity=options.entity,
                              group=options.group or sweep_group(run_dir), tags=list(options.tags),
                              name=f"{run_dir.parent.name}/{run_dir.name}", config=dataclasses.asdict(cfg),
                              dir=str(run_dir), mode=self.mode, id=run_id, resume="allow")

    def log(self, row: dict) -> None:
        self.run.log(_numbers(row), step=row["step"])

    def summary(self, summary: dict) -> None:
        self.run.summary.update(_numbers(summary))

    def close(self) -> str | None:
        offline_dir = Path(self.run.dir).parent  # <run dir>/wandb/offline-run-<time>-<id>
        self.run.finish()
        return f"wandb: logged offline; upload with: wandb sync {offline_dir}" if self.mode == "offline" else None


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict) -> None:
        for key, value in _numbers(row).items():
            if key != "step":
                self.writer.add_scalar(key, value, row["step"])

    def summary(self, summary: dict) -> None:
        self.writer.add_text("summary", json.dumps(summary, indent=1))

    def close(self) -> str | None:
        self.writer.close()
        return None


class Loggers:
    """Fan-out to the backends; a backend that raises is dropped after one warning line."""

    def __init__(self, cfg: Config, run_dir: Path, warn: Callable[[str], None]):
        self.warn = warn
        self.backends = []
        self._start("metrics.jsonl", lambda: JsonlLogger(run_dir))
        if cfg.logger.wandb:
            self._start("wandb", lambda: WandbLogger(cfg, run_dir))
        if cfg.logger.tensorboard:
            self._start("tensorboard", lambda: TensorBoardLogger(run_dir))

    def _start(self, name: str, make) -> None:
        try:
            self.backends.append(make())
        except Exception as err:  # noqa: BLE001 - no logger may stop a run
            self._switch_off(name, err)

    def _switch_off(self, name: str, err: Exception) -> None:
        self.warn(f"warning: logger {name} failed ({type(err).__name__}: {err}); switched off, training goes on")

    def call(self, method: str, *args) -> list:
        results = []
        for backend in list(self.backends):
            try:
                results.append(getattr(backend, method)(*args))
            except Exception as err:  # noqa: BLE001 - no logger may stop a run
                self.backends.remove(backend)
                self._switch_off(backend.name, err)
        return results


def wandb_mode(mode: str) -> str:
    """auto: WANDB_MODE if set, else online only with an API key and a reachable server."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if not os.environ.get("WANDB_API_KEY"):
        return "offline"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


def sweep_group(run_dir: Path) -> str | None:
    """In a Hydra sweep, the sweep directory's name (the parent of the job's directory); else None."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    mode = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.mode", default=None)
    return run_dir.parent.name if str(mode) == "MULTIRUN" else None


def _numbers(row: dict) -> dict:
    """The finite numeric entries, nested dicts flattened (`final_eval/eval_loss`)."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in _numbers(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[key] = value
    return flat
