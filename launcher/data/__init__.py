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
           the format settings and the code that decides an entry's contents
           (cache.py says which); rank 0 builds a missing entry while the other
           ranks wait
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

Modules: sources (where rows come from), checks (bad input named), formats (rows ->
text and target spans), encoding (-> token arrays), cache (the on-disk entries),
sequences (length filtering, packing), sampler (order and batches); this one runs them.
"""
from __future__ import annotations

import logging
import time

from launcher.config import DataConfig
from launcher.data.cache import _cache_key, cached
from launcher.data.encoding import _tokenize_splits, encode_rows
from launcher.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, FALLBACK_CHAT_TEMPLATE, ensure_chat_template
from launcher.data.sampler import GlobalBatchSampler, collate
from launcher.data.sequences import Example, PackedSequence, TrainSet, eval_examples, pack_sequences
from launcher.data.sources import Source, is_hub_name, load_rows, resolve_source
from launcher.demo_task import DEMO_DIR, TOKENIZER_DIR

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "FALLBACK_CHAT_TEMPLATE", "Example", "GlobalBatchSampler",
           "PackedSequence", "TrainSet", "collate", "encode_rows", "is_hub_name", "load_rows", "load_splits",
           "load_tokenizer", "pack_sequences", "resolve_source"]

log = logging.getLogger(__name__)


def load_tokenizer(model_path: str | None, tokenizer_path: str | None):
    from transformers import AutoTokenizer

    path = tokenizer_path or model_path or str(TOKENIZER_DIR)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        key = "model.tokenizer" if tokenizer_path else "model.path"
        raise ValueError(f"{key}={path}: no tokenizer could be loaded there ({err})") from err


def _sources(cfg: DataConfig) -> tuple[Source, Source | None]:
    train_path = cfg.path or str(DEMO_DIR / "train.jsonl")
    train = resolve_source(train_path, "data.path", cfg.split)
    if cfg.eval_path or not cfg.path:
        eval_path = cfg.eval_path or str(DEMO_DIR / "eval.jsonl")
        return train, resolve_source(eval_path, "data.eval_path", cfg.eval_split or cfg.split)
    if cfg.eval_split:
        return train, resolve_source(cfg.path, "data.eval_split", cfg.eval_split)
    return train, None


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
