"""Examples -> token sequences -> global batches that do not depend on the world size.

`load_splits` runs the whole pipeline once, at start-up, so every check on the data
happens before the first step and a run never fails mid-way on a bad row:

  source   through `datasets`: a local jsonl/json/parquet/csv/arrow file or a directory
           of them, a saved dataset (`save_to_disk`), or a hub name ("org/name") when
           no local path has that name
  format   text | prompt_completion | chat | alpaca: each row becomes one text, the
           character spans whose tokens carry the loss, and where the prompt ends
  tokens   input_ids and already-shifted labels (-100 where there is no loss), cached
           on disk before truncation, keyed by the sources' contents, the tokenizer,
           the format settings and this file's code; rank 0 builds a missing entry
           while the other ranks wait
  length   examples longer than trainer.seq_len are truncated or dropped
           (data.overlong), and examples left without a target token are dropped;
           both counts are logged
  packing  data.packing=true lays several examples end to end in each sequence of
           trainer.seq_len (best-fit decreasing: deterministic, independent of the
           world size); collate then emits position_ids that restart per document and
           document_ids that keep attention inside each document, so a packed batch
           has the loss and gradients of the same examples unpacked

The sampler fixes a seeded order per epoch over the training sequences (examples, or
packed sequences); global batch k is the same sequences whatever the world size, and
each rank takes its contiguous slice of it, split into micro-batches.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kernels.reference import IGNORE_INDEX
from launcher.config import DataConfig
from launcher.demo_task import DEMO_DIR, TOKENIZER_DIR

log = logging.getLogger(__name__)

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_BATCH_ROWS = 1000
_PROGRESS_MIN_ROWS = 50_000  # a tokenisation progress bar (rank 0) from this many rows on
_FULL_HASH_MAX_BYTES = 1 << 30  # above this the cache key samples the files instead of hashing them whole
_CODE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

# The prompt of Stanford Alpaca (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Set on a tokenizer that has no chat template when data.format=chat (and so exported
# with it): "<|role|>\n" + content, each assistant turn closed by the eos token.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


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


def load_tokenizer(model_path: str | None, tokenizer_path: str | None):
    from transformers import AutoTokenizer

    path = tokenizer_path or model_path or str(TOKENIZER_DIR)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        key = "model.tokenizer" if tokenizer_path else "model.path"
        raise ValueError(f"{key}={path}: no tokenizer could be loaded there ({err})") from err


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the documented fallback (FALLBACK_CHAT_TEMPLATE)."""
    if not getattr(tokenizer, "chat_template", None):
        log.info("data.format=chat: the tokenizer has no chat template; using the fallback '<|role|>\\n' template")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


# --------------------------------------------------------------------------- sources


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


def check_json(path: Path) -> int:
    """The number of rows; raise ValueError naming file:line and the line's start for the first malformed one.

    datasets' own error names neither the file nor the line. A .jsonl file (or a .json
    file that is not one JSON document) must hold one JSON object per line.
    """
    try:
        if path.suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:
                doc = json.loads(text)
                return len(doc) if isinstance(doc, list) else 1
            except json.JSONDecodeError as err:
                lines = text.splitlines()
                first_line = next((line for line in lines if line.strip()), "")
                if text.lstrip()[:1] in ("[", "{") and not _parses(first_line):  # one multi-line document
                    line = lines[err.lineno - 1] if err.lineno <= len(lines) else ""
                    raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno}): "
                                     f"{_line_start(line)}") from None
            return _check_json_lines(path, lines)
        with open(path, encoding="utf-8") as lines:
            return _check_json_lines(path, lines)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def _check_json_lines(path: Path, lines) -> int:
    rows = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rows += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: malformed JSON line ({err.msg}, column {err.colno}): "
                             f"{_line_start(line)}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected one JSON object per line, got "
                             f"{type(row).__name__}: {_line_start(line)}")
    return rows


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _line_start(line: str, width: int = 60) -> str:
    line = line.rstrip("\n")
    return repr(line[:width] + ("..." if len(line) > width else ""))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------- formats


@dataclass
class _Rendered:
    """One row as text: the character spans whose tokens are targets and where the prompt ends."""

    text: str
    spans: list[tuple[int, int]]
    prompt_end: int  # the (last) target starts here; what comes before is the prompt at evaluation
    target: str
    bos_eos: bool  # prepend the tokenizer's bos and append a target eos (chat templates do their own)


# (format -> the config fields naming the columns it needs; alpaca's input column may be absent)
_COLUMNS = {
    "text": ("text_column",),
    "prompt_completion": ("prompt_column", "completion_column"),
    "chat": ("messages_column",),
    "alpaca": ("instruction_column", "output_column"),
}


def check_columns(rows, cfg: DataConfig, label: str) -> None:
    found = list(rows.column_names)
    for key in _COLUMNS[cfg.format]:
        name = getattr(cfg, key)
        if name not in found:
            raise ValueError(f"{label}: no column {name!r} for data.format={cfg.format}; columns found: "
                             f"{', '.join(found)} (set data.{key}=<column>)")


def _render_rows(batch: dict[str, list], cfg: DataConfig, tokenizer, label: str, first_row: int) -> list[_Rendered]:
    n = len(next(iter(batch.values())))

    def column(key: str, optional: bool = False) -> list[str]:
        name = getattr(cfg, key)
        values = batch.get(name)
        if values is None:  # an optional column that is absent
            return [""] * n
        if all(isinstance(v, str) for v in values):
            return values
        for i, v in enumerate(values):
            if v is None and not optional:
                raise ValueError(f"{label} row {first_row + i + 1}: column {name!r} is empty (null)")
        return ["" if v is None else v if isinstance(v, str) else str(v) for v in values]

    if cfg.format == "text":
        return [_Rendered(text, [(0, len(text))], 0, text, True) for text in column("text_column")]
    if cfg.format == "chat":
        return [_render_chat(messages, tokenizer, cfg.train_on_prompt, f"{label} row {first_row + i + 1}")
                for i, messages in enumerate(batch[cfg.messages_column])]
    if cfg.format == "prompt_completion":
        prompts, targets = column("prompt_column"), column("completion_column")
    else:  # alpaca
        prompts = [(ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction,
                                                                                      input=extra)
                   for instruction, extra in zip(column("instruction_column"), column("input_column", True))]
        targets = column("output_column")
    rendered = []
    for prompt, target in zip(prompts, targets):
        text = prompt + target
        spans = [(0, len(text))] if cfg.train_on_prompt else [(len(prompt), len(text))]
        rendered.append(_Rendered(text, spans, len(prompt), target, True))
    return rendered


def _render_chat(messages, tokenizer, train_on_prompt: bool, where: str) -> _Rendered:
    """The conversation through the chat template; the targets are the assistant turns.

    An assistant turn spans from the end of the conversation before it rendered with
    the generation prompt to the end of the conversation through it (so its
    end-of-turn marker is a target, trailing whitespace is not). A template whose
    renderings are not prefixes of each other falls back to the turn's content plus
    any special tokens right after it.
    """
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        raise ValueError(f"{where}: expected a non-empty list of {{'role': ..., 'content': ...}} messages, "
                         f"got {_line_start(repr(messages))}")

    def render(turns, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        text = render(messages)
    except Exception as err:  # noqa: BLE001 - jinja raises anything the template author chose
        raise ValueError(f"{where}: the chat template failed on this conversation: {_first_line(err)}") from None
    specials = sorted((t for t in getattr(tokenizer, "all_special_tokens", []) if t), key=len, reverse=True)
    spans, cursor, last = [], 0, None
    for i, message in enumerate(messages):
        content = str(message["content"])
        if message["role"] != "assistant":  # only moves the cursor past the turn, where the content is found
            found = text.find(content, cursor)
            cursor = found + len(content) if found >= 0 and content else cursor
            continue
        try:
            before, through = render(messages[:i], True), render(messages[: i + 1])
        except Exception:  # noqa: BLE001
            before = through = None
        if (before is not None and text.startswith(before) and text.startswith(through)
                and cursor <= len(before) <= len(through)):
            start, end = len(before), len(through)
        else:
            start = text.find(content, cursor)
            if start < 0:
                raise ValueError(f"{where}: the chat template's output does not contain assistant turn {i + 1}'s "
                                 f"content; use data.train_on_prompt=true or another template")
            end = start + len(content)
            while special := next((t for t in specials if text.startswith(t, end)), None):
                end += len(special)
        while end > start and text[end - 1].isspace():
            end -= 1
        spans.append((start, end))
        cursor, last = max(cursor, end), message
    prompt_end = spans[-1][0] if spans else len(text)
    target = str(last["content"]) if last is not None else ""
    return _Rendered(text, [(0, len(text))] if train_on_prompt else spans, prompt_end, target, False)


# --------------------------------------------------------------------------- tokens


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


# --------------------------------------------------------------------------- cache


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


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


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


# --------------------------------------------------------------------------- splits


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


def _sources(cfg: DataConfig) -> tuple[Source, Source | None]:
    train_path = cfg.path or str(DEMO_DIR / "train.jsonl")
    train = resolve_source(train_path, "data.path", cfg.split)
    if cfg.eval_path or not cfg.path:
        eval_path = cfg.eval_path or str(DEMO_DIR / "eval.jsonl")
        return train, resolve_source(eval_path, "data.eval_path", cfg.eval_split or cfg.split)
    if cfg.eval_split:
        return train, resolve_source(cfg.path, "data.eval_split", cfg.eval_split)
    return train, None


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


def load_splits(cfg: DataConfig, tokenizer, seq_len: int, seed: int) -> tuple[TrainSet, list[Example]]:
    """(training sequences, held-out examples). The demo task reads its bundled files.

    Every data error surfaces here as a ValueError naming the key, the file (and line)
    and the fix. The returned TrainSet's `describe()` and `efficiency` report packing.
    """
    started = time.perf_counter()
    if cfg.format == "chat":
        ensure_chat_template(tokenizer)
    train_source, eval_source = _sources(cfg)
    key = _cache_key(cfg, tokenizer, [train_source, eval_source], seed)
    meta = {"train": train_source.label, "eval": eval_source.label if eval_source else None, "format": cfg.format,
            "tokenizer": getattr(tokenizer, "name_or_path", ""), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (train_enc, eval_enc), hit = cached(
        cfg, key, lambda: _tokenize_splits(cfg, tokenizer, train_source, eval_source, seed), meta)
    train = TrainSet(train_enc, seq_len, cfg.overlong, cfg.packing, train_source.label)
    held_out = eval_examples(eval_enc, seq_len, cfg.overlong, (eval_source or train_source).label) \
        if eval_enc is not None else []
    log.info("data: %s; %d eval examples (%s in %.1fs)", train.describe(), len(held_out),
             "tokenised cache hit" if hit else "tokenised" + (", cached" if cfg.cache else ""),
             time.perf_counter() - started)
    return train, held_out


# --------------------------------------------------------------------------- order and batches


class GlobalBatchSampler:
    """Global batch k = sequences order[k*G:(k+1)*G] of a seeded per-epoch permutation.

    The order depends only on (seed, epoch, global batch size), never on the world
    size or micro batch, so runs factored differently see the same data, and the
    position to resume from is just the number of optimizer steps taken. With packing
    the unit is the packed sequence, and packing does not depend on the world size.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        if num_examples < global_batch_size:
            raise ValueError(f"trainer.global_batch_size={global_batch_size} is larger than the "
                             f"{num_examples} training sequences; lower it")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = num_examples // global_batch_size  # the incomplete tail is dropped
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._epoch = epoch
        return self._order

    def global_batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch_size
        return self.order(epoch)[start : start + self.global_batch_size].tolist()

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's slice of global batch `step`, as micro-batches in order."""
        batch = self.global_batch(step)
        per_rank = len(batch) // world_size
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def collate(items: list[Example | PackedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: pads carry no loss and, being last, see no future.

    With packed sequences the batch also holds position_ids (restarting at 0 in each
    document) and document_ids (attention stays within a document; pads are -1).
    """
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    packed = any(isinstance(item, PackedSequence) for item in items)
    if packed:
        position_ids = torch.arange(width).repeat(len(items), 1)
        document_ids = torch.full((len(items), width), -1, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        if packed:
            doc_lens = torch.tensor(getattr(item, "doc_lens", None) or [n])
            document_ids[row, :n] = torch.repeat_interleave(torch.arange(len(doc_lens)), doc_lens)
            doc_starts = torch.repeat_interleave(torch.cumsum(doc_lens, 0) - doc_lens, doc_lens)
            position_ids[row, :n] = torch.arange(n) - doc_starts
            position_ids[row, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch.update(position_ids=position_ids, document_ids=document_ids)
    return batch
