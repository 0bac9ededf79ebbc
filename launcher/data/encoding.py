"""Rendered rows -> flat token arrays: input ids, which tokens carry the loss, where each prompt ends.

`_tokenize_splits` builds what the cache stores: the training rows and the held-out
rows, tokenised once and untruncated.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from launcher.config import DataConfig
from launcher.data.checks import check_columns
from launcher.data.formats import _render_rows, _Rendered
from launcher.data.sources import Source, load_rows

log = logging.getLogger(__name__)

_BATCH_ROWS = 1000
_PROGRESS_MIN_ROWS = 50_000  # a tokenisation progress bar (rank 0) from this many rows on


class _Encoder:
    """Texts -> (token ids, each token's start character), as the tokenizer's own __call__ tokenises.

    A fast tokenizer's Rust backend is called directly (several times faster than
    __call__ on short texts), after checking on the first texts that it agrees with
    __call__. Without offsets (slow tokenizers), each piece between span boundaries
    is tokenised on its own.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        self.backend = getattr(tokenizer, "backend_tokenizer", None) if self.fast else None
        self.checked = False

    def __call__(self, rendered: list[_Rendered]) -> list[tuple[list[int], list[int]]]:
        texts = [r.text for r in rendered]
        if self.backend is not None:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            out = [(e.ids, [s for s, _ in e.offsets]) for e in encodings]
            if not self.checked:
                self.checked = True
                if self.tokenizer(texts[:8], add_special_tokens=False)["input_ids"] != [ids for ids, _ in out[:8]]:
                    log.info("the tokenizer's __call__ differs from its backend; tokenising through __call__")
                    self.backend = None
                    return self(rendered)
            return out
        if self.fast:
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            return [(ids, [s for s, _ in offsets]) for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"])]
        return [self._by_pieces(r) for r in rendered]

    def _by_pieces(self, r: _Rendered) -> tuple[list[int], list[int]]:
        cuts = sorted({0, len(r.text), r.prompt_end, *(edge for span in r.spans for edge in span)})
        pieces = [(a, r.text[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]
        encoded = self.tokenizer([p for _, p in pieces], add_special_tokens=False)["input_ids"] if pieces else []
        ids, starts = [], []
        for (a, _), piece_ids in zip(pieces, encoded):
            ids += piece_ids
            starts += [a] * len(piece_ids)
        return ids, starts


@dataclass
class Encoded:
    """Rows as flat token arrays, untruncated: row i is ids[offsets[i]:offsets[i+1]].

    `trains[j]` says whether token j carries loss when it is a label (the first token
    of a row never is). `texts` holds (prompt, target) of the rows kept for evaluation.
    """

    ids: np.ndarray  # int32
    trains: np.ndarray  # bool
    offsets: np.ndarray  # int64, rows + 1
    prompt_lens: np.ndarray  # int32: tokens before the first target token of the last target
    texts: list[tuple[str, str]] | None = None

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def select(self, rows: np.ndarray) -> Encoded:
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.offsets[rows], np.diff(self.offsets)[rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        texts = [self.texts[r] for r in rows] if self.texts is not None else None
        return Encoded(self.ids[index], self.trains[index], offsets, self.prompt_lens[rows], texts)

    def save(self, directory: Path, name: str) -> None:
        for field in ("ids", "trains", "offsets", "prompt_lens"):
            np.save(directory / f"{name}.{field}.npy", getattr(self, field))
        if self.texts is not None:
            (directory / f"{name}.texts.json").write_text(json.dumps(self.texts))

    @classmethod
    def load(cls, directory: Path, name: str) -> Encoded:
        arrays = {field: np.load(directory / f"{name}.{field}.npy", mmap_mode="r" if field in ("ids", "trains")
                                 else None) for field in ("ids", "trains", "offsets", "prompt_lens")}
        texts_file = directory / f"{name}.texts.json"
        texts = [tuple(t) if t else None for t in json.loads(texts_file.read_text())] \
            if texts_file.exists() else None
        return cls(**arrays, texts=texts)


def encode_rows(rows, cfg: DataConfig, tokenizer, label: str, keep_text: Callable[[int], bool] | None = None,
                progress: bool = True) -> Encoded:
    """Tokenise every row of a `datasets.Dataset` (in batches; a progress bar on rank 0 for large ones)."""
    from tqdm import tqdm

    check_columns(rows, cfg, label)
    encoder = _Encoder(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks_ids, chunks_trains, lengths, prompt_lens = [], [], [], []
    texts = [] if keep_text is not None else None
    bar = tqdm(total=len(rows), desc=f"tokenizing {label}", unit=" rows", leave=False,
               disable=not progress or _rank() != 0 or len(rows) < _PROGRESS_MIN_ROWS)
    first_row = 0
    for batch in rows.iter(batch_size=_BATCH_ROWS):
        rendered = _render_rows(batch, cfg, tokenizer, label, first_row)
        batch_ids, batch_trains = [], []
        for i, (r, (ids, starts)) in enumerate(zip(rendered, encoder(rendered))):
            trains = _in_spans(starts, r.spans)
            prompt_len = bisect.bisect_left(starts, r.prompt_end)  # token starts are in order
            if r.bos_eos and bos is not None:
                ids, trains, prompt_len = [bos, *ids], [False, *trains], prompt_len + 1
            if r.bos_eos and eos is not None:
                ids, trains = [*ids, eos], [*trains, True]
            batch_ids += ids
            batch_trains += trains
            lengths.append(len(ids))
            prompt_lens.append(prompt_len)
            if texts is not None and keep_text(first_row + i):
                texts.append((r.text[: r.prompt_end], r.target))
            elif texts is not None:
                texts.append(None)
        chunks_ids.append(np.asarray(batch_ids, dtype=np.int32))
        chunks_trains.append(np.asarray(batch_trains, dtype=bool))
        first_row += len(rendered)
        bar.update(len(rendered))
    bar.close()
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return Encoded(np.concatenate(chunks_ids), np.concatenate(chunks_trains), offsets,
                   np.asarray(prompt_lens, dtype=np.int32), texts)


def _in_spans(starts: list[int], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token (by its start character; starts are in order) begins inside a span."""
    trains = [False] * len(starts)
    for a, b in spans:
        first, stop = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
        trains[first:stop] = [True] * (stop - first)
    return trains


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _tokenize_splits(cfg: DataConfig, tokenizer, train_source: Source, eval_source: Source | None,
                     seed: int) -> tuple[Encoded, Encoded | None]:
    rows = load_rows(train_source)
    if eval_source is None and cfg.eval_fraction > 0:  # hold out a seeded fraction of the training rows
        n = len(rows)
        n_eval = max(1, int(n * cfg.eval_fraction))
        if n_eval >= n:
            raise ValueError(f"data.eval_fraction={cfg.eval_fraction}: holds out all {n} rows of "
                             f"{train_source.label}; lower it or pass data.eval_path")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        evaluated = order[: min(n_eval, cfg.max_eval_examples)]
        keep = set(evaluated.tolist())
        encoded = encode_rows(rows, cfg, tokenizer, train_source.label, keep_text=keep.__contains__)
        train_rows = np.ones(n, dtype=bool)
        train_rows[order[:n_eval]] = False
        train = encoded.select(np.flatnonzero(train_rows))
        train.texts = None
        return train, encoded.select(evaluated) if len(evaluated) else None
    train = encode_rows(rows, cfg, tokenizer, train_source.label)
    if eval_source is None or not cfg.max_eval_examples:
        return train, None
    eval_rows = load_rows(eval_source)
    eval_rows = eval_rows.select(range(min(len(eval_rows), cfg.max_eval_examples)))
    return train, encode_rows(eval_rows, cfg, tokenizer, eval_source.label, keep_text=lambda _: True)
