"""Examples and training sequences from the tokenised rows: length filtering, then packing.

Both happen after the cache, so trainer.seq_len, data.overlong and data.packing never
make a new cache entry.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from kernels.reference import IGNORE_INDEX
from launcher.data.encoding import Encoded

log = logging.getLogger(__name__)


@dataclass
class Example:
    prompt: str  # the text before the targets ("" for plain text, and for training examples)
    target: str  # the text whose tokens carry the loss ("" for training examples)
    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens of input_ids before the first target token is predicted

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class PackedSequence:
    """Several examples end to end; `doc_lens` are their lengths in input tokens, in order."""

    input_ids: list[int]
    labels: list[int]
    doc_lens: list[int]

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _filter(encoded: Encoded, seq_len: int, overlong: str) -> dict[str, np.ndarray | int]:
    """Which rows train and how many of their ids: overlong rows truncated or dropped, rows without targets dropped."""
    lengths = np.diff(encoded.offsets)
    over = lengths - 1 > seq_len
    keep = ~over if overlong == "drop" else np.ones(len(lengths), dtype=bool)
    lengths = np.minimum(lengths, seq_len + 1)
    starts = encoded.offsets[:-1]
    cumulative = np.concatenate([[0], np.cumsum(encoded.trains, dtype=np.int64)])
    # a row's targets: its trained tokens among ids[1:length] (none when it has fewer than 2 ids)
    targets = cumulative[starts + lengths] - cumulative[np.minimum(starts + 1, starts + lengths)]
    no_target = keep & (targets <= 0)
    keep &= ~no_target
    rows = np.flatnonzero(keep)
    return {"rows": rows, "starts": starts[rows], "lengths": lengths[rows],
            "truncated": int((over & keep).sum()) if overlong == "truncate" else 0,
            "dropped": int(over.sum()) if overlong == "drop" else 0, "no_target": int(no_target.sum())}


def pack_sequences(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: groups of indices whose sizes sum to <= capacity.

    Deterministic (ties keep index order); a bit mask of the free capacities that
    some open sequence has makes each placement O(capacity / 64).
    """
    bins: list[list[int]] = []
    open_with: dict[int, list[int]] = {}  # free capacity -> open sequences with exactly that much room
    free_mask = 0  # bit r set: some open sequence has r free slots
    for index in np.argsort(-np.asarray(sizes), kind="stable").tolist():
        size = int(sizes[index])
        fitting = free_mask >> size
        if fitting:
            room = size + (fitting & -fitting).bit_length() - 1  # the tightest fit
            target = open_with[room].pop()
            if not open_with[room]:
                free_mask &= ~(1 << room)
        else:
            room, target = capacity, len(bins)
            bins.append([])
        bins[target].append(index)
        room -= size
        if room > 0:
            open_with.setdefault(room, []).append(target)
            free_mask |= 1 << room
    return bins


class TrainSet:
    """The training sequences: item i is an Example, or with packing a PackedSequence.

    Tokens stay in flat arrays (memory-mapped from the cache), so a large dataset costs
    its token arrays rather than Python objects per example. Training examples carry
    no prompt/target text.
    """

    def __init__(self, encoded: Encoded, seq_len: int, overlong: str, packing: bool, label: str):
        kept = _filter(encoded, seq_len, overlong)
        self.ids, self.trains = encoded.ids, encoded.trains
        self.starts, self.lengths = kept["starts"], kept["lengths"]
        self.prompt_lens = encoded.prompt_lens[kept["rows"]]
        self.seq_len, self.packing = seq_len, packing
        self.n_rows, self.n_examples = len(encoded), len(kept["rows"])
        self.truncated, self.dropped, self.no_target = kept["truncated"], kept["dropped"], kept["no_target"]
        _report_filtering(label, "training", self.n_rows, seq_len, kept)
        if not self.n_examples:
            raise ValueError(f"{label}: no usable training examples: of {self.n_rows:,} rows, {self.dropped:,} are "
                             f"longer than trainer.seq_len={seq_len} (dropped: data.overlong=drop) and "
                             f"{self.no_target:,} have no target token left; raise trainer.seq_len, use "
                             f"data.overlong=truncate or check the columns")
        self.n_tokens = int((self.lengths - 1).sum())
        self.bin_offsets = self.bin_members = None
        if packing:
            bins = pack_sequences(self.lengths - 1, seq_len)
            self.bin_offsets = np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int64)
            self.bin_members = np.asarray([i for b in bins for i in b], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.bin_offsets) - 1 if self.packing else self.n_examples

    def __getitem__(self, i: int) -> Example | PackedSequence:
        if not self.packing:
            return self.example(i)
        members = self.bin_members[self.bin_offsets[i] : self.bin_offsets[i + 1]].tolist()
        parts = [self.example(m) for m in members]
        return PackedSequence([t for p in parts for t in p.input_ids], [t for p in parts for t in p.labels],
                              [len(p.input_ids) for p in parts])

    def example(self, i: int) -> Example:
        start, n = int(self.starts[i]), int(self.lengths[i])
        ids = np.asarray(self.ids[start : start + n], dtype=np.int64)
        labels = np.where(self.trains[start + 1 : start + n], ids[1:], IGNORE_INDEX)
        return Example("", "", ids[:-1].tolist(), labels.tolist(), min(int(self.prompt_lens[i]), n - 1))

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots (sequences x seq_len)."""
        return self.n_tokens / (len(self) * self.seq_len)

    def describe(self) -> str:
        unpacked = self.n_tokens / (self.n_examples * self.seq_len)
        if self.packing:
            return (f"{self.n_examples:,} train examples packed into {len(self):,} sequences of {self.seq_len} "
                    f"tokens ({self.efficiency:.1%} filled; unpacked {unpacked:.1%})")
        return f"{self.n_examples:,} train examples ({self.n_tokens:,} tokens, {unpacked:.1%} of seq_len slots)"


def _report_filtering(label: str, what: str, n_rows: int, seq_len: int, kept: dict) -> None:
    if kept["truncated"] or kept["dropped"]:
        log.warning("%s: %d of %d %s examples longer than trainer.seq_len=%d: %d truncated, %d dropped "
                    "(data.overlong)", label, kept["truncated"] + kept["dropped"], n_rows, what, seq_len,
                    kept["truncated"], kept["dropped"])
    if kept["no_target"]:
        log.warning("%s: %d of %d %s examples have no target token (after truncation) and are dropped",
                    label, kept["no_target"], n_rows, what)


def eval_examples(encoded: Encoded, seq_len: int, overlong: str, label: str) -> list[Example]:
    kept = _filter(encoded, seq_len, overlong)
    _report_filtering(label, "eval", len(encoded), seq_len, kept)
    out = []
    for row, start, n in zip(kept["rows"].tolist(), kept["starts"].tolist(), kept["lengths"].tolist()):
        ids = np.asarray(encoded.ids[start : start + n], dtype=np.int64)
        labels = np.where(encoded.trains[start + 1 : start + n], ids[1:], IGNORE_INDEX)
        prompt, target = encoded.texts[row] if encoded.texts and encoded.texts[row] else ("", "")
        out.append(Example(prompt, target, ids[:-1].tolist(), labels.tolist(),
                           min(int(encoded.prompt_lens[row]), n - 1)))
    return out
