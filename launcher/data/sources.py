"""Where a split's rows come from, and its fingerprint (part of the cache key).

A local jsonl/json/parquet/csv/arrow file or a directory of them, a dataset saved with
`save_to_disk`, or a hub name ("org/name") when no local path has that name; the rows
are read through `datasets`.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.data.checks import _first_line, check_json

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FULL_HASH_MAX_BYTES = 1 << 30  # above this the cache key samples the files instead of hashing them whole


@dataclass
class Source:
    """Where one split's rows come from; `fingerprint` changes whenever the rows may have."""

    key: str  # the config key, for messages
    path: str
    kind: str  # files | saved | hub
    files: list[Path]
    loader: str | None  # the datasets builder of `files`
    split: str
    fingerprint: str
    dataset: Any = None  # hub: loaded while fingerprinting

    @property
    def label(self) -> str:
        return f"{self.key}={self.path}"


def resolve_source(path: str, key: str, split: str = "train") -> Source:
    """A local file or directory, a saved dataset, or a hub dataset name."""
    local = Path(path).expanduser()
    if local.exists():
        files = _visible_files(local) if local.is_dir() else [local]
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            return Source(key, path, "saved", files, None, split, f"saved:{split}:{_fingerprint_files(files, local)}")
        files = [p for p in files if p.suffix in _LOADERS] if local.is_dir() else files
        kinds = {_LOADERS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            raise ValueError(f"{key}={path}: expected files of one kind among {', '.join(_LOADERS)} "
                             f"(or a dataset saved with save_to_disk)")
        return Source(key, path, "files", files, kinds.pop(), split, _fingerprint_files(files, local))
    if is_hub_name(path):
        dataset = _load_hub(path, key, split)
        return Source(key, path, "hub", [], None, split, f"hub:{path}:{split}:{dataset._fingerprint}", dataset)
    raise ValueError(f"{key}={path}: no such file or directory")


def is_hub_name(path: str) -> bool:
    """"org/name" with no data-file suffix, and no such local path: a dataset on the hub."""
    return bool(_HUB_NAME.fullmatch(path)) and Path(path).suffix not in _LOADERS and not Path(path).exists()


def _visible_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _fingerprint_files(files: list[Path], root: Path) -> str:
    """Names, sizes and contents; above _FULL_HASH_MAX_BYTES, mtimes and each file's first and last MiB."""
    digest = hashlib.blake2b(digest_size=16)
    whole = sum(p.stat().st_size for p in files) <= _FULL_HASH_MAX_BYTES
    for p in files:
        stat = p.stat()
        name = p.relative_to(root) if root.is_dir() else p.name
        digest.update(f"{name}\0{stat.st_size}\0{'' if whole else stat.st_mtime_ns}\0".encode())
        with open(p, "rb") as f:
            if whole:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            else:
                digest.update(f.read(1 << 20))
                f.seek(max(0, stat.st_size - (1 << 20)))
                digest.update(f.read())
    return digest.hexdigest()


def _load_hub(name: str, key: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - any failure means the same to the user
        raise ValueError(f"{key}={name}: not a local file or directory, and datasets could not load it as a "
                         f"hub dataset (split {split!r}): {_first_line(err)}") from None


def load_rows(source: Source):
    """The source's rows as a `datasets.Dataset` (not empty); malformed JSON is located here."""
    import datasets

    datasets.disable_progress_bars()
    if source.kind == "hub":
        rows = source.dataset
    elif source.kind == "saved":
        rows = datasets.load_from_disk(source.path)
        if isinstance(rows, datasets.DatasetDict):
            if source.split not in rows:
                raise ValueError(f"{source.label}: no split {source.split!r}; splits found: "
                                 f"{', '.join(rows)} (set data.split / data.eval_split)")
            rows = rows[source.split]
    else:
        if all(not p.stat().st_size for p in source.files):
            raise ValueError(f"{source.label}: no rows (an empty file)")
        try:
            rows = datasets.load_dataset(source.loader, data_files=[str(p) for p in source.files], split="train")
        except Exception as err:  # noqa: BLE001
            # datasets' message names neither the file nor the line: find them
            if source.loader == "json" and not sum(check_json(path) for path in source.files):
                raise ValueError(f"{source.label}: no rows (only blank lines)") from None
            raise ValueError(f"{source.label}: datasets could not read it: {_first_line(err)}") from None
    if len(rows) == 0:
        raise ValueError(f"{source.label}: no rows (an empty file or dataset)")
    return rows
