"""Examples -> token sequences -> global batches that do not depend on the world size.

Each example becomes `input_ids` and already-shifted `labels` (the token to predict
at each position, -100 where there is no loss). The sampler fixes a seeded order per
epoch; global batch k is the same examples whatever the world size, and each rank
takes its contiguous slice of it, split into micro-batches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.reference import IGNORE_INDEX
from launcher.config import DataConfig
from launcher.demo_task import DEMO_DIR, TOKENIZER_DIR

log = logging.getLogger(__name__)

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class Example:
    prompt: str  # the text before the targets ("" for plain text)
    target: str  # the text whose tokens carry the loss
    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens of input_ids before the first target token is predicted

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


def read_records(path: str, key: str) -> list[dict]:
    """Rows of a local jsonl/json/parquet/csv/arrow file or directory, or a saved dataset."""
    import datasets

    source = Path(path)
    if not source.exists():
        raise ValueError(f"{key}={path}: no such file or directory")
    datasets.disable_progress_bars()
    if (source / "dataset_info.json").exists():
        return list(datasets.load_from_disk(str(source)))
    files = sorted(p for p in source.rglob("*") if p.suffix in _LOADERS) if source.is_dir() else [source]
    kinds = {_LOADERS.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) != 1:
        raise ValueError(f"{key}={path}: expected files of one kind among {', '.join(_LOADERS)}")
    table = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    return list(table)


def _prompt_and_target(record: dict, cfg: DataConfig, source: str) -> tuple[str, str]:
    def column(name: str) -> str:
        if name not in record:
            raise ValueError(f"{source}: no column {name!r}; columns found: {', '.join(sorted(record))} "
                             f"(set data.*_column)")
        return str(record[name])

    if cfg.format == "text":
        return "", column(cfg.text_column)
    if cfg.format == "prompt_completion":
        return column(cfg.prompt_column), column(cfg.completion_column)
    raise ValueError(f"data.format={cfg.format}: not supported yet; use text or prompt_completion")


def tokenize(records: list[dict], cfg: DataConfig, tokenizer, seq_len: int, source: str) -> list[Example]:
    examples, dropped, truncated = [], 0, 0
    for record in records:
        prompt, target = _prompt_and_target(record, cfg, source)
        prompt_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prompt_ids += tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt_ids + target_ids
        trains = [cfg.train_on_prompt] * len(prompt_ids) + [True] * len(target_ids)
        if len(ids) - 1 > seq_len:
            if cfg.overlong == "drop":
                dropped += 1
                continue
            truncated += 1
            ids, trains = ids[: seq_len + 1], trains[: seq_len + 1]
        labels = [tok if train else IGNORE_INDEX for tok, train in zip(ids[1:], trains[1:])]
        examples.append(Example(prompt, target, ids[:-1], labels, min(len(prompt_ids), len(ids) - 1)))
    if dropped or truncated:
        log.warning("%s: %d examples longer than seq_len=%d dropped, %d truncated", source, dropped, seq_len,
                    truncated)
    if not examples:
        raise ValueError(f"{source}: no usable examples (empty, or all longer than trainer.seq_len={seq_len})")
    return examples


def load_splits(cfg: DataConfig, tokenizer, seq_len: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Train and eval examples. The demo task reads its bundled files."""
    train_path = cfg.path or str(DEMO_DIR / "train.jsonl")
    eval_path = cfg.eval_path or (None if cfg.path else str(DEMO_DIR / "eval.jsonl"))
    records = read_records(train_path, "data.path")
    eval_records = read_records(eval_path, "data.eval_path") if eval_path else []
    if not eval_path and cfg.eval_fraction > 0:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = max(1, int(len(records) * cfg.eval_fraction))
        eval_records = [records[i] for i in order[:n_eval]]
        records = [records[i] for i in order[n_eval:]]
    train = tokenize(records, cfg, tokenizer, seq_len, train_path)
    held_out = tokenize(eval_records[: cfg.max_eval_examples], cfg, tokenizer, seq_len, eval_path or train_path) \
        if eval_records and cfg.max_eval_examples else []
    return train, held_out


class GlobalBatchSampler:
    """Global batch k = examples order[k*G:(k+1)*G] of a seeded per-epoch permutation.

    The order depends only on (seed, epoch, global batch size), never on the world
    size or micro batch, so runs factored differently see the same data, and the
    position to resume from is just the number of optimizer steps taken.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        if num_examples < global_batch_size:
            raise ValueError(f"trainer.global_batch_size={global_batch_size} is larger than the "
                             f"{num_examples} training examples; lower it")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = num_examples // global_batch_size  # the incomplete tail is dropped

    def global_batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = index * self.global_batch_size
        return order[start : start + self.global_batch_size].tolist()

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's slice of global batch `step`, as micro-batches in order."""
        batch = self.global_batch(step)
        per_rank = len(batch) // world_size
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pads carry no loss and, being last, see no future."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        input_ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
    return {"input_ids": input_ids, "labels": labels}
