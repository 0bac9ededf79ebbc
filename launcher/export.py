"""`launch export run=<run dir or checkpoint dir> out=<dir>`: a Hugging Face directory from any checkpoint.

A LoRA run exports its peft adapter directory into `out` (what
`peft.PeftModel.from_pretrained(base, out)` loads) and the merged model into `out/merged`.
A QLoRA run's checkpoints hold the frozen base as 4-bit storage, which is of no use
without its quantisation state: the base is rebuilt and quantised as the run did it
(model.path, or the seeded random init; bitsandbytes runs on the CPU) and only the
adapters come from the checkpoint; the merged model is the dequantised base plus them.

One process, no process group, no GPU, whatever strategy and world size wrote the
checkpoint: DCP checkpoints (single, ddp, fsdp, hsdp) are read with `dcp.load`, which
gathers the shards into full tensors; DeepSpeed ones with its `zero_to_fp32`. The
architecture and tokenizer come from the run's resolved config.yaml (and model.path
when the run started from a Hugging Face model). The checkpoint is verified first
(checkpoint.problem); for a run directory that is its newest sound checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from strategies import checkpoint

USAGE = "usage: launch export run=<run dir or checkpoints/step-N dir> out=<dir>"


def export(run: Path, out: Path) -> Path:
    """Writes config.json, model.safetensors and the tokenizer of `run`'s checkpoint into `out`."""
    from kernels.models import save_pretrained
    from launcher import peft_export
    from launcher.data import load_tokenizer
    from launcher.model_factory import build_meta_model, build_model
    from launcher.precision import Precision
    from strategies.distributed import core_spec, plain_core

    run_dir, step_dir = _locate(run)
    cfg = _run_config(run_dir)
    if cfg.peft.method == "qlora":  # the storage dtype the run resolved (auto) is part of its identity
        cfg.peft.bnb_4bit_quant_storage = _recorded_4bit_storage(
            step_dir or checkpoint.find_latest(run_dir / "checkpoints"))
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
    meta_core = build_meta_model(cfg, len(tokenizer))
    identity = checkpoint.run_stamp(meta_core.config, cfg)["identity"]
    if step_dir is None:
        step_dir = checkpoint.select_resume("auto", run_dir / "checkpoints", identity)
        if step_dir is None:
            raise ValueError(f"run={run}: no sound committed checkpoint under {run_dir / 'checkpoints'}")
    else:
        found = checkpoint.problem(step_dir, identity)
        if found:
            raise ValueError(f"run={run}: {found}; pass another checkpoints/step-N directory or the run directory")
    dtype = Precision.resolve(cfg.trainer.precision, torch.device("cpu")).param_dtype
    wanted = [k for k in meta_core.state_dict() if cfg.peft.method != "qlora" or ".lora_" in k]
    if (step_dir / checkpoint.DEEPSPEED_DIR).is_dir():
        state = {k: v for k, v in _deepspeed_state(step_dir).items() if k in wanted}
    else:
        state = _dcp_state(step_dir, meta_core, dtype, wanted)
    if cfg.peft.method == "qlora":
        core = build_model(cfg.model, len(tokenizer), torch.device("cpu"), dtype, cfg.trainer.seed, cfg.peft)
        missing, unexpected = core.load_state_dict(state, strict=False)
        assert not unexpected and all(".lora_" not in k for k in missing), (missing, unexpected)
    else:
        core = plain_core(core_spec(meta_core), state)
    if peft_export.has_adapters(core):
        peft_export.save_adapter(core, out, base_model_name_or_path=cfg.model.path)
        core, out = peft_export.merged(core), out / "merged"
    save_pretrained(core, out)
    tokenizer.save_pretrained(out)
    return out


def _locate(run: Path) -> tuple[Path, Path | None]:
    """(run directory, checkpoint directory or None for "the newest")."""
    if (run / "config.yaml").is_file():
        return run, None
    if (run / checkpoint.TRAINER_STATE).is_file() and (run.parent.parent / "config.yaml").is_file():
        return run.parent.parent, run  # RUN/checkpoints/step-N
    raise ValueError(f"run={run}: neither a run directory (with config.yaml) nor one of its "
                     f"checkpoints/step-N directories")


def _run_config(run_dir: Path):
    """The typed config the run used; only value checks (the run's data need not exist here)."""
    from launcher.config import Config

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_dir / "config.yaml")))
    except Exception as err:  # noqa: BLE001 - OmegaConf and schema errors alike: the file is not ours
        raise ValueError(f"run={run_dir}: config.yaml does not fit this version's schema ({err})") from None


def _recorded_4bit_storage(step_dir: Path | None) -> str:
    """The storage dtype a QLoRA checkpoint recorded (`auto` resolved on the run's device)."""
    trainer_state = step_dir / checkpoint.TRAINER_STATE if step_dir else None
    if trainer_state is None or not trainer_state.is_file():
        return "auto"  # nothing recorded: the identity check that follows says what is wrong
    identity = json.loads(trainer_state.read_text()).get("identity") or {}
    return identity.get("peft", {}).get("bnb_4bit_quant_storage", "auto")


def _dcp_state(step_dir: Path, meta_core, dtype: torch.dtype, keys: list[str]) -> dict[str, torch.Tensor]:
    """The model's full tensors named `keys` (shaped as `meta_core`'s) from a DCP checkpoint, without a process
    group."""
    import torch.distributed.checkpoint as dcp

    shapes = {k: v for k, v in meta_core.state_dict().items() if k in keys}
    if meta_core.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # the embedding, tied again on load
    state = {"model": {k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype)
                       for k, v in shapes.items()}}
    dcp.load(state, checkpoint_id=str(step_dir))
    return state["model"]


def _deepspeed_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights that zero_to_fp32 assembles from the per-rank ZeRO partitions."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=checkpoint.DEEPSPEED_DIR)
    # ZeRO-3 wraps the core in a module whose attribute is `core` (strategies/zero.py _ForwardOrLogits)
    return {k.removeprefix("core."): v for k, v in state.items()}


def main(argv: list[str]) -> None:
    args = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    unknown = [arg for arg in argv if "=" not in arg or arg.split("=", 1)[0] not in ("run", "out")]
    if unknown or not {"run", "out"} <= args.keys():
        print(f"launch export: error: {' '.join(unknown) or 'run= and out= are required'}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    try:
        out = export(Path(args["run"]), Path(args["out"]))
    except ValueError as err:
        print(f"launch export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported {out}")
