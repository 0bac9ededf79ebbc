"""Sizes found by trial steps on the device: `trainer.micro_batch_size=auto` and
`trainer.activation_checkpointing=auto`.

Micro batch: the largest that fits. Candidates are the divisors of each rank's share
of the global batch (global / world size), so accumulation stays a whole number and
the effective batch is unchanged.

Checkpointing: the fewest checkpointed blocks that fit, so spare memory buys speed
(no recomputation) instead of sitting idle. Blocks are checkpointed from the first and
their inputs offloaded to host memory (kernels/models/offload.py: the copies hide
behind compute, and every block kept whole needs the room they free); a trial with u
blocks left whole keeps u blocks' activations more than full offloaded checkpointing.
When both are auto, the micro batch is searched first with every block checkpointed,
then the blocks at that micro batch.

Memory grows with the size searched, so a binary search needs about log2(#candidates)
trials. A trial is forward + backward at the real sequence length on random tokens,
with gradient sync off and no optimizer step (the weights are untouched); its peak
plus the optimizer states the first real step will allocate must stay under the
budget: `trainer.memory_budget_gib`, else the card's memory minus a margin for the
allocator's fragmentation. An out-of-memory error means "does not fit": it is caught
and the memory released (accelerate's helpers). Every rank runs the same trials and
the verdicts are agreed by all-reduce, so all ranks pick the same size. Each result is
cached in the run directory, keyed by everything that decides memory, so a restart or
resume does not search again.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils.memory import release_memory, should_reduce_batch_size
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

MICRO_BATCH_CACHE = "auto_micro_batch.json"
CHECKPOINTING_CACHE = "auto_checkpointing.json"
# Share of the card a trial may peak at when no budget is given: the allocator's
# fragmentation and the CUDA context live in the rest.
DEFAULT_BUDGET_FRACTION = 0.9


def candidates(per_rank_batch: int) -> list[int]:
    """Micro batches that split one rank's share of the global batch evenly, ascending."""
    return [m for m in range(1, per_rank_batch + 1) if per_rank_batch % m == 0]


def largest_fitting(sizes: list[int], fits: Callable[[int], bool]) -> int | None:
    """Binary search for the largest size that fits, assuming memory grows with the size."""
    low, high, best = 0, len(sizes) - 1, None
    while low <= high:
        middle = (low + high) // 2
        if fits(sizes[middle]):
            best, low = sizes[middle], middle + 1
        else:
            high = middle - 1
    return best


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What the first step will allocate for this rank's optimizer states (0 once they exist).

    AdamW keeps two moments per parameter in the parameter's dtype; bitsandbytes' 8-bit
    variants one byte each; paged variants live in unified memory that pages to the
    host, so they do not count against the card.
    """
    if optimizer.state:
        return 0
    name = type(optimizer).__name__
    if name.startswith("Paged"):
        return 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    per_element = (lambda p: 2) if "8bit" in name else (lambda p: 2 * p.element_size())
    return sum(p.numel() * per_element(p) for p in local)


def budget_bytes(budget_gib: float, device: torch.device) -> int:
    if budget_gib > 0:
        return int(budget_gib * 2**30)
    if device.type != "cuda":
        return 2**62  # host memory: only an out-of-memory error says no
    return int(torch.cuda.get_device_properties(device).total_memory * DEFAULT_BUDGET_FRACTION)


def _peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def device_trial(model, strategy, autocast, seq_len: int, vocab_size: int, budget: int) -> Callable[[int], bool]:
    """fits(micro): one forward + backward of `micro` random sequences within `budget` bytes, on every rank."""
    device = strategy.device
    reserved_for_optimizer = optimizer_state_bytes(strategy.optimizer)

    def fits(micro: int) -> bool:
        input_ids = labels = loss_sum = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            input_ids = torch.randint(1, vocab_size, (micro, seq_len), device=device)
            labels = input_ids.roll(-1, dims=1)
            with strategy.accumulate(is_last=False), autocast():
                loss_sum, _ = model(input_ids=input_ids, labels=labels)
            strategy.backward(loss_sum, torch.tensor(micro * seq_len, device=device))
            peak = _peak_bytes(device) + reserved_for_optimizer
            ok = peak <= budget
            log.info("auto trial: %d x %d tokens peaks at %.2f GiB (incl. %.2f GiB optimizer states) -> %s",
                     micro, seq_len, peak / 2**30, reserved_for_optimizer / 2**30, "fits" if ok else "over budget")
        except Exception as err:  # noqa: BLE001 - only out-of-memory errors are a verdict; the rest re-raise
            if not should_reduce_batch_size(err):
                raise
            ok = False
            log.info("auto trial: %d x %d tokens ran out of memory", micro, seq_len)
        finally:
            strategy.optimizer.zero_grad(set_to_none=True)
            for param in model.parameters():
                param.grad = None
            release_memory(input_ids, labels, loss_sum)
        # Every rank must agree, or they would pick different sizes (and hang in the first step).
        failures = strategy.all_reduce_sum(torch.tensor(0.0 if ok else 1.0, device=device))
        return float(failures) == 0.0

    return fits


def cached_search(cache: Path, key: dict, sizes: list[int], fits: Callable[[int], bool],
                  write_cache: bool) -> int | None:
    """The size cached under `key`, or the largest of `sizes` that fits (cached by the main rank; None: none fits)."""
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return int(cached["size"])
    best = largest_fitting(sizes, fits)
    if best is not None and write_cache:
        cache.write_text(json.dumps({"key": key, "size": best}, indent=1))
    return best


def resolve(run_dir: Path, key: dict, per_rank_batch: int, fits: Callable[[int], bool], write_cache: bool) -> int:
    """The micro batch: cached for `key`, or the largest fitting candidate; ValueError if none fits."""
    best = cached_search(run_dir / MICRO_BATCH_CACHE, key, candidates(per_rank_batch), fits, write_cache)
    if best is None:
        raise ValueError(f"trainer.micro_batch_size=auto: not even 1 sequence of trainer.seq_len={key['seq_len']} "
                         f"fits the memory budget; lower trainer.seq_len, set trainer.activation_checkpointing=full "
                         f"(or offload), use peft=lora or a sharding strategy (fsdp, zero3), or raise "
                         f"trainer.memory_budget_gib")
    return best


def resolve_checkpointing(run_dir: Path, key: dict, num_blocks: int, fits_whole: Callable[[int], bool],
                          write_cache: bool) -> int:
    """How many blocks to checkpoint: fits_whole(u) says whether u blocks left whole fit; ValueError if none fits."""
    whole = cached_search(run_dir / CHECKPOINTING_CACHE, key, list(range(num_blocks + 1)), fits_whole, write_cache)
    if whole is None:
        raise ValueError(f"trainer.activation_checkpointing=auto: even with all {num_blocks} blocks checkpointed, "
                         f"micro batch {key['micro_batch_size']} x trainer.seq_len={key['seq_len']} does not fit the "
                         f"memory budget; use a smaller trainer.micro_batch_size or trainer.seq_len, peft=lora "
                         f"or a sharding strategy (fsdp, zero3), or raise trainer.memory_budget_gib")
    return num_blocks - whole


def _memory_key(cfg, strategy, world_size: int) -> dict:
    """Everything besides the searched size that decides a trial's peak memory."""
    import dataclasses

    trainer = cfg.trainer
    return {
        "device": torch.cuda.get_device_name(strategy.device) if strategy.device.type == "cuda" else "cpu",
        "model": {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("name", "path", "tokenizer")},
        "peft": dataclasses.asdict(cfg.peft), "strategy": dataclasses.asdict(cfg.strategy),
        "optim": cfg.optim.name, "world_size": world_size, "seq_len": trainer.seq_len,
        "precision": trainer.precision, "activation_checkpointing": trainer.activation_checkpointing,
        "memory_budget_gib": trainer.memory_budget_gib,
    }


def _trial(cfg, model, strategy, autocast) -> Callable[[int], bool]:
    # Users get auto sizes on GPUs only (launcher.compose.check_machine); on the CPU only an
    # out-of-memory error says no, which is how the tests simulate a limit.
    return device_trial(model, strategy, autocast, cfg.trainer.seq_len, strategy.unwrapped().config.vocab_size,
                        budget_bytes(cfg.trainer.memory_budget_gib, strategy.device))


def for_run(cfg, run_dir: Path, model, strategy, autocast, world_size: int) -> int:
    """The micro batch for this run: cached, or searched on the device with the real model and optimizer."""
    key = _memory_key(cfg, strategy, world_size)
    fits = _trial(cfg, model, strategy, autocast)
    micro = resolve(run_dir, key, cfg.trainer.global_batch_size // world_size, fits, write_cache=strategy.is_main)
    log.info("auto micro batch: %d sequences of %d tokens per device", micro, cfg.trainer.seq_len)
    return micro


def checkpointed_blocks_for_run(cfg, run_dir: Path, model, strategy, autocast, world_size: int) -> int:
    """How many blocks this run checkpoints (trainer.activation_checkpointing=auto); sets them on the model."""
    micro = cfg.trainer.micro_batch_size
    key = dict(_memory_key(cfg, strategy, world_size), micro_batch_size=micro)
    core = strategy.unwrapped()
    num_blocks = len(core.model.layers)
    fits = _trial(cfg, model, strategy, autocast)

    def fits_whole(whole: int) -> bool:
        core.set_activation_checkpointing("offload", num_blocks - whole)
        return fits(micro)

    blocks = resolve_checkpointing(run_dir, key, num_blocks, fits_whole, write_cache=strategy.is_main)
    core.set_activation_checkpointing("offload", blocks)
    log.info("auto activation checkpointing: %d of %d blocks recompute in backward", blocks, num_blocks)
    return blocks
