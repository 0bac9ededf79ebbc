"""Atomic, verified, resumable checkpoints in PyTorch Distributed Checkpoint (DCP) format.

Layout of a run directory:

    checkpoints/step-00000100/   model + optimizer shards (DCP), rng-rankN.pt, trainer.json,
                                 MANIFEST.json (size and sha256 of every file), COMMITTED
    checkpoints/latest           name of the newest committed checkpoint

A checkpoint is written into `.tmp-step-N`; the ranks then hash its files (each rank a
share), rank 0 writes MANIFEST.json and the COMMITTED marker last and renames the
directory into place: a crash or a full disk mid-save leaves only a temp directory
that nothing loads and the next successful save removes. Committed checkpoints are
never written into again (a checkpoint of the same step that this run did not resume
from is replaced whole).

DCP itself has no payload checksums (a flipped byte loads silently), hence the
manifest. trainer.json records the run's identity: the model architecture and the
peft config, the fields a checkpoint must match to be loaded into this run. Everything
else (batch, lr, steps, logging, strategy, world size) may change between runs;
`config_sha256` (the whole resolved config) is recorded only for provenance.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger(__name__)
# A single process without a process group is a supported case, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

COMMIT_MARKER = "COMMITTED"
MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer.json"
DEEPSPEED_DIR = "deepspeed"  # a DeepSpeed engine's checkpoint lives in step-N/deepspeed/
# DecoderConfig fields that do not change the computation a checkpoint's weights belong to.
_NOT_IDENTITY = {"initializer_range", "bos_token_id", "eos_token_id", "pad_token_id"}


class OneProcess:
    """The group of a lone process; strategies are the group otherwise (rank, world_size, barrier, all_reduce_sum)."""

    rank, world_size = 0, 1

    def barrier(self) -> None:
        pass

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value


class CheckpointSaveError(ValueError):
    """Saving failed on some rank; nothing was committed and earlier checkpoints are untouched.

    A ValueError so that the entry points report it in one line: the user acts on it
    (frees disk space, fixes permissions) and resumes.
    """


def run_stamp(model_config, cfg) -> dict:
    """What every checkpoint of this run records: its identity (checked on resume) and the config hash."""
    architecture = {k: v for k, v in dataclasses.asdict(model_config).items() if k not in _NOT_IDENTITY}
    config_json = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    peft = {"method": "none"}
    if cfg.peft.method != "none":  # keys the method does not use have no say
        peft = {k: v for k, v in dataclasses.asdict(cfg.peft).items()
                if cfg.peft.method == "qlora" or not k.startswith("bnb_4bit_")}
    return {"identity": {"model": architecture, "peft": peft},
            "config_sha256": hashlib.sha256(config_json.encode()).hexdigest()}


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


def _together(group, action: Callable[[], None], what: str) -> None:
    """Run `action` on this rank; if it failed on any rank, every rank raises (none is left at a barrier)."""
    error = None
    try:
        action()
    except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
        error = err
    failed = int(group.all_reduce_sum(torch.tensor([float(error is not None)])).item())
    if error is not None:
        raise CheckpointSaveError(f"{what}: {error}") from error
    if failed:
        raise CheckpointSaveError(f"{what}: failed on {failed} other rank(s) (their log says why)")


class PendingCheckpoint:
    """A checkpoint whose shards are still being written in the background (dcp.async_save).

    `result()` (every rank, at the same point of the loop) waits for the writes, then
    hashes, seals and commits exactly as a synchronous save does; until then nothing
    under `path` exists and `latest` names the previous checkpoint.
    """

    def __init__(self, path: Path, finish: Callable[[], Path]):
        self.path = path
        self._finish = finish

    def result(self) -> Path:
        return self._finish()


def commit(root: Path, step: int, write_payload: Callable[[Path], Future | None], scheduler, trainer_state: dict,
           group=OneProcess(), keep_last: int = 2) -> Path | PendingCheckpoint:
    """Write checkpoint `step` under `root` atomically; returns its committed path.

    Every rank calls `write_payload(tmp_dir)` (its shards); only rank 0 writes the
    trainer state, the manifest and the marker, renames and moves `latest`. A failure
    on any rank raises CheckpointSaveError on every rank after the temp directory is
    removed; the previous checkpoint and `latest` stay as they were. When
    `write_payload` returns a Future (its shards still being written), the rest waits
    in the returned PendingCheckpoint; scheduler, RNG and trainer state are taken now.
    """
    final, tmp = _step_dir(root, step), root / f".tmp-step-{step:08d}"
    previous = find_latest(root)
    in_flight: list[Future] = []

    def prepare() -> None:
        if group.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
            tmp.mkdir(parents=True)

    def write() -> None:
        in_flight.extend(filter(None, [write_payload(tmp)]))
        torch.save(_rng_state(), tmp / f"rng-rank{group.rank:05d}.pt")
        if group.rank == 0:
            state = dict(trainer_state, step=step, scheduler=scheduler.state_dict())
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))

    def payload_written() -> None:
        for future in in_flight:
            future.result()  # re-raises what the background writer hit

    def hash_share() -> None:  # every file is hashed by one rank, after all are written
        files = _payload_files(tmp)
        share = {name: _describe(tmp / name) for name in files[group.rank::group.world_size]}
        (tmp / f".manifest-rank{group.rank:05d}.json").write_text(json.dumps(share))

    def seal() -> None:
        if group.rank == 0:
            _seal(root, tmp, final)

    def point_latest() -> None:
        if group.rank == 0:
            _fsync_write(root / ".latest.tmp", final.name)
            os.replace(root / ".latest.tmp", root / "latest")
            _prune(root, keep_last)

    def run(actions) -> None:
        try:
            for action in actions:
                _together(group, action, f"saving checkpoint {final}")
        except CheckpointSaveError as err:
            if group.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointSaveError(f"{err}; nothing was committed, {kept}; free the space or fix the cause "
                                      f"and resume with trainer.resume=auto") from err.__cause__

    def finish() -> Path:
        run((payload_written, hash_share, seal))
        _together(group, point_latest,
                  f"checkpoint {final} is committed, but moving {root / 'latest'} or pruning failed")
        return final

    run((prepare, write))
    return PendingCheckpoint(final, finish) if in_flight else finish()


def _seal(root: Path, tmp: Path, final: Path) -> None:
    """Rank 0, every share hashed: manifest, marker, rename into place."""
    files = {}
    for share in sorted(tmp.glob(".manifest-rank*.json")):
        files.update(json.loads(share.read_text()))
        share.unlink()
    _fsync_write(tmp / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))
    _fsync_write(tmp / COMMIT_MARKER, "")
    if final.exists():  # a checkpoint this run did not resume from (resume=never, or skipped as damaged)
        replaced = root / f".replaced-{final.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(tmp, final)


def save(root: Path, step: int, model, optimizer, scheduler, trainer_state: dict, group=OneProcess(),
         keep_last: int = 2, in_background: bool = False, background_group=None) -> Path | PendingCheckpoint:
    """A DCP checkpoint of model and optimizer, committed atomically.

    `in_background`: the shards are staged to CPU memory now and written by
    dcp.async_save in a thread, which talks over `background_group` (a gloo group of
    its own, so it never shares a communicator with training; None for one process);
    the commit is then a PendingCheckpoint.
    """
    def write_dcp(tmp: Path) -> Future | None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        if in_background:
            return dcp.async_save(state, checkpoint_id=str(tmp), process_group=background_group)
        dcp.save(state, checkpoint_id=str(tmp))
        return None

    return commit(root, step, write_dcp, scheduler, trainer_state, group, keep_last)


def _payload_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and not p.name.startswith(".manifest-rank"))


def _describe(path: Path) -> dict:
    with open(path, "rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _prune(root: Path, keep_last: int) -> None:
    """Old committed checkpoints beyond keep_last, and what failed or replaced saves left behind."""
    committed = sorted(p for p in root.glob("step-*") if is_committed(p))
    for stale in [*committed[:-keep_last], *root.glob(".tmp-step-*"), *root.glob(".replaced-step-*")]:
        shutil.rmtree(stale)


def find_latest(root: Path) -> Path | None:
    """The newest committed checkpoint under `root`, or None (unverified: see `select_resume`)."""
    committed = sorted(p for p in root.glob("step-*") if is_committed(p)) if root.is_dir() else []
    return committed[-1] if committed else None


def problem(path: Path, identity: dict, group=OneProcess(), checksums: bool = True) -> str | None:
    """What keeps checkpoint `path` from being resumed by this run, or None; the same answer on every rank.

    Marker, manifest, file sizes and identity are checked by every rank (metadata
    only); the checksums (unless `checksums` is off: they read every byte) are split
    over the ranks and the findings all-reduced.
    """
    found = _metadata_problem(path, identity)
    if found or not checksums:
        return found
    files = sorted(json.loads((path / MANIFEST).read_text())["files"].items())
    # slot r: 1 + the index of the first file rank r found corrupted (0: none)
    first_bad = torch.zeros(group.world_size)
    for index in range(group.rank, len(files), group.world_size):
        name, expected = files[index]
        if _describe(path / name)["sha256"] != expected["sha256"]:
            first_bad[group.rank] = index + 1
            break
    bad = [int(v) - 1 for v in group.all_reduce_sum(first_bad).tolist() if v > 0]
    return f"{files[min(bad)][0]} fails its checksum (corrupted)" if bad else None


def _metadata_problem(path: Path, identity: dict) -> str | None:
    if not is_committed(path):
        return f"no {COMMIT_MARKER} marker (an interrupted save)"
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"no readable {MANIFEST} (damaged, or written by a version without checksums)"
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were written (truncated or damaged)"
    try:
        saved = json.loads((path / TRAINER_STATE).read_text()).get("identity")
    except (OSError, ValueError):
        return f"{TRAINER_STATE} is unreadable"
    return _identity_difference(saved, identity)


def _identity_difference(saved: dict | None, ours: dict) -> str | None:
    if saved is None:
        return "no model identity recorded (written by an older version)"
    diffs = [f"{group}.{key}: checkpoint {saved.get(group, {}).get(key)!r}, this run {value!r}"
             for group in ("model", "peft") for key, value in ours[group].items()
             if saved.get(group, {}).get(key) != value]
    return f"written for another model ({'; '.join(diffs)})" if diffs else None


def select_resume(resume: str, root: Path, identity: dict, group=OneProcess(),
                  checksums: bool = True) -> Path | None:
    """The checkpoint `trainer.resume` names, verified (a collective: every rank calls it).

    auto: the newest checkpoint under `root` that passes `problem`; each one skipped is
    reported in one warning line. A PATH that fails is a ValueError.
    """
    if resume == "never":
        return None
    if resume == "auto":
        for candidate in sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []:
            found = problem(candidate, identity, group, checksums)
            if found is None:
                return candidate
            if group.rank == 0:
                log.warning("skipping checkpoint %s: %s", candidate, found)
        return None
    path = Path(resume)
    found = problem(path, identity, group, checksums) if path.is_dir() else "no such directory"
    if found:
        raise ValueError(f"trainer.resume={resume}: {found}; use auto, never or another committed "
                         f"checkpoints/step-N directory")
    return path


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
    if (path / DEEPSPEED_DIR).is_dir():
        raise ValueError(f"trainer.resume={path}: written by a DeepSpeed strategy (zero1/2/3), which this strategy "
                         f"cannot load; resume with the zero strategy that wrote it, or export the weights "
                         f"(launch export run={path} out=DIR) and start a new run from model.path=DIR "
                         f"(the optimizer state is not carried over)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return restore_trainer_state(path, scheduler, rank)
