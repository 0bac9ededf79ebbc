"""Hugging Face model directories <-> DecoderLM: config.json plus safetensors (single or sharded).

Loading builds the model on the meta device and assigns tensors straight from the
files, so the weights exist once. Saving writes into a temporary sibling directory
and renames it into place, so a crash never leaves a half-written export.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.dispatch import REFERENCE_OPS, Ops
from kernels.models.config import DecoderConfig
from kernels.models.decoder import DecoderLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TIED_KEY = "lm_head.weight"
# Older conversions saved the RoPE frequencies; they are recomputed, never loaded.
IGNORED_SUFFIX = "rotary_emb.inv_freq"


def load_config(path: str | os.PathLike) -> DecoderConfig:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model.path={path}: no such directory; point it at a Hugging Face model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model.path={path}: no config.json; point it at a Hugging Face model directory")
    try:
        return DecoderConfig.from_hf_dict(json.loads(config_file.read_text()))
    except (KeyError, ValueError) as e:
        raise ValueError(f"model.path={path}: config.json: {e}") from e


def load_pretrained(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ops: Ops = REFERENCE_OPS,
) -> DecoderLM:
    path = Path(path)
    config = load_config(path)
    with torch.device("meta"):
        model = DecoderLM(config, ops)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        del expected[TIED_KEY]
    key_to_file = _weight_map(path)
    found = {k for k in key_to_file if not k.endswith(IGNORED_SUFFIX)}
    missing = sorted(expected.keys() - found)
    unexpected = sorted(found - expected.keys() - ({TIED_KEY} if config.tie_word_embeddings else set()))
    if missing or unexpected:
        raise ValueError(
            f"model.path={path}: the checkpoint does not match its config.json "
            f"(missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'})"
        )

    state = {}
    for file in sorted({key_to_file[k] for k in expected}):
        with safe_open(path / file, framework="pt", device=str(torch.device(device))) as f:
            for key in (k for k in f.keys() if k in expected):
                tensor = f.get_tensor(key)
                if tensor.shape != expected[key]:
                    raise ValueError(
                        f"model.path={path}: {key} has shape {list(tensor.shape)}, "
                        f"config.json implies {list(expected[key])}"
                    )
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared Parameter
    model.reset_rope(device)
    return model


def _weight_map(path: Path) -> dict[str, str]:
    """{tensor name: file name} from the shard index, or from the single file."""
    if (path / INDEX_FILE).is_file():
        return json.loads((path / INDEX_FILE).read_text())["weight_map"]
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}
    raise ValueError(
        f"model.path={path}: neither {SINGLE_FILE} nor {INDEX_FILE}; convert the weights to safetensors"
    )


def save_pretrained(
    model: DecoderLM,
    path: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> None:
    """Writes what transformers' save_pretrained writes (tied lm_head omitted), atomically."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: pick a directory path for the export")
    config = model.config
    state = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == TIED_KEY)}
    shards = _plan_shards(state, max_shard_bytes, dtype)
    saved_dtype = dtype or next(v.dtype for v in state.values() if v.is_floating_point())

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf_config = {**config.to_hf_dict(), "dtype": str(saved_dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        token_ids = {
            k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(config, k) is not None
        }
        if token_ids:
            (tmp / "generation_config.json").write_text(json.dumps(token_ids, indent=2) + "\n")
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
        ]
        for name, keys in zip(names, shards):
            tensors = {k: _exported(state[k], dtype) for k in keys}
            save_file(tensors, tmp / name, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(v, dtype) for v in state.values())},
                "weight_map": {k: name for name, keys in zip(names, shards) for k in keys},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exported(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.detach().cpu().contiguous()


def _nbytes(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    item_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.numel() * item_dtype.itemsize


def _plan_shards(state: dict, max_shard_bytes: int, dtype: torch.dtype | None) -> list[list[str]]:
    """Greedy in key order, as transformers shards; a tensor larger than the limit gets its own shard."""
    shards, size = [[]], 0
    for key, tensor in state.items():
        nbytes = _nbytes(tensor, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _replace_dir(new: Path, target: Path) -> None:
    """Renames `new` to `target`; an existing `target` is moved aside first and removed last."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)
