"""The on-disk cache of tokenised splits: its keys, one builder per entry, entries written whole.

Rank 0 builds a missing entry while the other ranks wait (or, before the process group
exists, the processes of one machine take turns on a file lock); an entry appears by an
atomic rename, so a reader never sees half of one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import torch

from launcher.config import DataConfig
from launcher.data import encoding, formats, sources
from launcher.data.encoding import Encoded
from launcher.data.sources import Source

log = logging.getLogger(__name__)

# The code whose changes can change what an entry holds, hashed into every key: which
# rows a source yields (sources), the text and target spans they become (formats), their
# tokens and the split into training and held-out rows (encoding), and how an entry is
# written and read back (this module). The other modules only raise on bad input
# (checks), pick the sources, whose fingerprints are in the key (__init__), or act after
# the cache (sequences: truncation and packing; sampler), so editing them keeps entries.
_CODE_HASH = hashlib.sha256(b"".join(Path(module_file).read_bytes() for module_file in (
    sources.__file__, formats.__file__, encoding.__file__, __file__))).hexdigest()[:16]


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("SLIPSTREAM_CACHE"):
        return Path(os.environ["SLIPSTREAM_CACHE"]).expanduser() / "data"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slipstream" / "data"


def _tokenizer_fingerprint(tokenizer) -> str:
    import transformers

    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([type(tokenizer).__name__, transformers.__version__, tokenizer.bos_token_id,
                              tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)],
                             default=str).encode())
    return digest.hexdigest()


def _cache_key(cfg: DataConfig, tokenizer, sources: list[Source | None], seed: int) -> str:
    held_out = sources[1] is None and cfg.eval_fraction > 0
    parts = {
        "code": _CODE_HASH, "tokenizer": _tokenizer_fingerprint(tokenizer),
        "format": cfg.format, "train_on_prompt": cfg.train_on_prompt,
        "columns": [getattr(cfg, f"{c}_column") for c in ("text", "prompt", "completion", "messages",
                                                            "instruction", "input", "output")],
        "sources": [s.fingerprint if s else None for s in sources],
        "eval": [cfg.max_eval_examples, cfg.eval_fraction, seed if held_out else None],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@contextlib.contextmanager
def _rank_zero_first():
    """Under an initialised process group, rank 0 runs the block first and the others after it."""
    group = (torch.distributed.is_available() and torch.distributed.is_initialized()
             and torch.distributed.get_world_size() > 1)
    rank = torch.distributed.get_rank() if group else 0
    if group and rank != 0:
        torch.distributed.barrier()
    try:
        yield
    finally:
        if group and rank == 0:
            torch.distributed.barrier()


@contextlib.contextmanager
def _file_lock(path: Path):
    """Processes of one machine (e.g. ranks before the process group exists) build an entry one at a time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps entries whole
        yield
        return
    try:
        handle = open(path, "a")  # noqa: SIM115 - closed below
    except OSError:  # a read-only cache: _write_entry says so
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_entry(entry: Path) -> tuple[Encoded, Encoded | None] | None:
    if not (entry / "meta.json").exists():
        return None
    try:
        train = Encoded.load(entry, "train")
        held_out = Encoded.load(entry, "eval") if (entry / "eval.ids.npy").exists() else None
        return train, held_out
    except (OSError, ValueError) as err:
        log.warning("data cache entry %s is unreadable (%s); tokenising again", entry, err)
        return None


def _write_entry(entry: Path, result: tuple[Encoded, Encoded | None], meta: dict) -> None:
    tmp = entry.with_name(f"{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        result[0].save(tmp, "train")
        if result[1] is not None:
            result[1].save(tmp, "eval")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the entry whole
        os.rename(tmp, entry)
    except OSError as err:
        if not (entry / "meta.json").exists():  # else another process wrote the same entry first
            log.warning("could not write the data cache entry %s (%s); continuing without it", entry, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached(cfg: DataConfig, key: str, build: Callable[[], tuple[Encoded, Encoded | None]],
           meta: dict) -> tuple[tuple[Encoded, Encoded | None], bool]:
    """(the tokenised splits, whether they came from the cache); built once, by rank 0 first."""
    if not cfg.cache:
        return build(), False
    root = cache_root(cfg)
    entry = root / key
    with _rank_zero_first():
        hit = _read_entry(entry)
        if hit is not None:
            return hit, True
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            log.warning("data cache %s cannot be created (%s); tokenising without it", root, err)
            return build(), False
        with _file_lock(root / f"{key}.lock"):
            hit = _read_entry(entry)
            if hit is not None:
                return hit, True
            result = build()
            _write_entry(entry, result, meta)
            return result, False
