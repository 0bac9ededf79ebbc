"""Atomic, resumable checkpoints in PyTorch Distributed Checkpoint (DCP) format.

Layout of a run directory:

    checkpoints/step-00000100/   model + optimizer shards (DCP), trainer.json, COMMITTED
    checkpoints/latest           name of the newest committed checkpoint

A checkpoint is written into `.tmp-step-N`, gets its COMMITTED marker last, and is
then renamed into place by rank 0: a crash mid-save leaves only a temp directory
that nothing ever loads. Committed checkpoints are never written into again.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger(__name__)
# A single process without a process group is a supported case, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

COMMIT_MARKER = "COMMITTED"
TRAINER_STATE = "trainer.json"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def is_committed(path: Path) -> bool:
    return (path / COMMIT_MARKER).is_file()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def commit(root: Path, step: int, write_payload: Callable[[Path], None], scheduler, trainer_state: dict,
           rank: int = 0, barrier=lambda: None, keep_last: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; returns its committed path.

    Every rank calls `write_payload(tmp_dir)` (its shards) between two barriers; only
    rank 0 writes the trainer state, the marker, renames and moves `latest`.
    """
    final, tmp = _step_dir(root, step), root / f".tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        tmp.mkdir(parents=True)
    barrier()
    write_payload(tmp)
    torch.save(_rng_state(), tmp / f"rng-rank{rank:05d}.pt")
    barrier()
    if rank == 0:
        state = dict(trainer_state, step=step, scheduler=scheduler.state_dict())
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        _fsync_write(tmp / COMMIT_MARKER, "")
        if final.exists():
            raise RuntimeError(f"{final} already exists; committed checkpoints are never overwritten")
        os.rename(tmp, final)
        _fsync_write(root / ".latest.tmp", final.name)
        os.replace(root / ".latest.tmp", root / "latest")
        _prune(root, keep_last)
    barrier()
    return final


def save(root: Path, step: int, model, optimizer, scheduler, trainer_state: dict, rank: int = 0,
         barrier=lambda: None, keep_last: int = 2) -> Path:
    """A DCP checkpoint of model and optimizer, committed atomically."""
    def write_dcp(tmp: Path) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))

    return commit(root, step, write_dcp, scheduler, trainer_state, rank, barrier, keep_last)


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _prune(root: Path, keep_last: int) -> None:
    committed = sorted(p for p in root.glob("step-*") if is_committed(p))
    for old in committed[:-keep_last]:
        shutil.rmtree(old)


def find_latest(root: Path) -> Path | None:
    """The newest committed checkpoint under `root`, or None."""
    committed = sorted(p for p in root.glob("step-*") if is_committed(p)) if root.is_dir() else []
    return committed[-1] if committed else None


def require_committed(path: Path) -> None:
    if not is_committed(path):
        raise ValueError(f"trainer.resume={path}: not a committed checkpoint (no {COMMIT_MARKER} marker)")


def restore_trainer_state(path: Path, scheduler, rank: int) -> dict:
    """Scheduler and this rank's RNG from a committed checkpoint; returns the trainer state."""
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    scheduler.load_state_dict(trainer_state.pop("scheduler"))
    rng_file = path / f"rng-rank{rank:05d}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def load(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    require_committed(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return restore_trainer_state(path, scheduler, rank)
