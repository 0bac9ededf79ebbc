"""trainer.micro_batch_size=auto: the search, the out-of-memory handling and the cache, on CPU with a simulated limit."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from kernels.models import DecoderConfig, DecoderLM
from launcher import auto_batch
from launcher.config import Config, OptimConfig
from strategies.single import SingleDevice

KEY = {"model": "tiny", "seq_len": 64, "world_size": 1}


def test_candidates_divide_the_per_rank_batch():
    assert auto_batch.candidates(8) == [1, 2, 4, 8]
    assert auto_batch.candidates(12) == [1, 2, 3, 4, 6, 12]


@pytest.mark.parametrize("limit,expected", [(1, 1), (5, 4), (11, 6), (12, 12), (0, None)])
def test_binary_search_finds_the_largest_that_fits(limit, expected):
    tried = []

    def fits(micro):
        tried.append(micro)
        return micro <= limit

    assert auto_batch.largest_fitting(auto_batch.candidates(12), fits) == expected
    assert len(tried) <= 3  # 6 candidates: ceil(log2(6 + 1)) trials


def test_result_is_cached_per_key(tmp_path):
    trials = []

    def fits(micro):
        trials.append(micro)
        return micro <= 4

    assert auto_batch.resolve(tmp_path, KEY, 16, fits, write_cache=True) == 4
    searched = len(trials)
    assert auto_batch.resolve(tmp_path, KEY, 16, fits, write_cache=True) == 4
    assert len(trials) == searched  # the restart read the cache
    assert auto_batch.resolve(tmp_path, dict(KEY, seq_len=128), 16, lambda m: m <= 2, write_cache=True) == 2


def test_nothing_fits_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"trainer.micro_batch_size=auto: not even 1 sequence of trainer.seq_len=64"):
        auto_batch.resolve(tmp_path, KEY, 8, lambda m: False, write_cache=True)
    assert not (tmp_path / auto_batch.MICRO_BATCH_CACHE).exists()


class OutOfMemoryAbove(torch.nn.Module):
    """The real model, but a batch above `limit` sequences fails the way the CUDA allocator does."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit = model, limit

    def forward(self, input_ids, labels):
        if input_ids.shape[0] > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.model(input_ids, labels)


def test_device_trial_treats_out_of_memory_as_too_big_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    core = DecoderLM(DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    strategy = SingleDevice(Config(optim=OptimConfig(lr=1e-3)), torch.device("cpu"))
    model = OutOfMemoryAbove(strategy.setup(core, lr=1e-3), limit=3)
    before = {name: p.detach().clone() for name, p in core.named_parameters()}
    fits = auto_batch.device_trial(model, strategy, contextlib.nullcontext,
                                   seq_len=16, vocab_size=64, budget=auto_batch.budget_bytes(0, strategy.device))
    assert auto_batch.largest_fitting(auto_batch.candidates(8), fits) == 2
    for name, param in core.named_parameters():
        assert param.grad is None
        assert torch.equal(param, before[name]), name


def test_other_errors_are_not_taken_for_out_of_memory():
    core = DecoderLM(DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    strategy = SingleDevice(Config(optim=OptimConfig(lr=1e-3)), torch.device("cpu"))
    strategy.setup(core, lr=1e-3)
    fits = auto_batch.device_trial(core, strategy, contextlib.nullcontext,
                                   seq_len=16, vocab_size=10_000, budget=2**62)  # ids past the vocabulary
    with pytest.raises(IndexError):
        fits(2)


def test_optimizer_state_estimate():
    params = [torch.nn.Parameter(torch.zeros(4096, 2)), torch.nn.Parameter(torch.zeros(8))]
    adamw = torch.optim.AdamW(params)
    assert auto_batch.optimizer_state_bytes(adamw) == 2 * 4 * (4096 * 2 + 8)
    for p in params:
        p.grad = torch.ones_like(p)
    adamw.step()
    assert auto_batch.optimizer_state_bytes(adamw) == 0  # allocated already: the trial's peak includes it
    bnb = pytest.importorskip("bitsandbytes")
    assert auto_batch.optimizer_state_bytes(bnb.optim.AdamW8bit(params)) == 2 * (4096 * 2 + 8)
    assert auto_batch.optimizer_state_bytes(bnb.optim.PagedAdamW(params)) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the search measures GPU memory")
def test_a_run_with_auto_micro_batch_respects_the_budget_and_caches(tmp_path):
    from launcher.compose import compose_config, to_config
    from launcher.loop import train

    overrides = ["trainer.micro_batch_size=auto", "trainer.global_batch_size=64", "trainer.seq_len=512",
                 "trainer.max_steps=2", "trainer.export_hf=false", "trainer.memory_budget_gib=0.1",
                 "data.max_eval_examples=0"]  # the budget is the training step's; evaluation batches are not searched
    summary = train(to_config(compose_config(overrides)), tmp_path)
    cached = json.loads((tmp_path / auto_batch.MICRO_BATCH_CACHE).read_text())
    assert 1 <= cached["size"] < 64 and 64 % cached["size"] == 0
    assert summary["peak_alloc_gib"] <= 0.1 * 1.1  # the trial's peak plus the optimizer states it reserved


# ------------------------------------------------------------- trainer.activation_checkpointing=auto


def test_checkpointing_search_takes_the_fewest_blocks_that_fit(tmp_path):
    key = dict(KEY, micro_batch_size=4)
    tried = []

    def fits_whole(whole):  # up to 5 of 16 blocks may keep their activations
        tried.append(whole)
        return whole <= 5

    assert auto_batch.resolve_checkpointing(tmp_path, key, 16, fits_whole, write_cache=True) == 11
    assert len(tried) <= 5  # 17 candidates: ceil(log2(17 + 1))
    assert auto_batch.resolve_checkpointing(tmp_path, key, 16, lambda whole: False, write_cache=True) == 11  # cached
    with pytest.raises(ValueError, match=r"activation_checkpointing=auto: even with all 16 blocks checkpointed"):
        auto_batch.resolve_checkpointing(tmp_path, dict(key, seq_len=128), 16, lambda whole: False, write_cache=True)


class OutOfMemoryWithFewCheckpoints(torch.nn.Module):
    """The real model, failing like the CUDA allocator while fewer than `needed` blocks are checkpointed."""

    def __init__(self, core, needed):
        super().__init__()
        self.core, self.needed = core, needed

    def forward(self, input_ids, labels):
        if self.core.checkpointed_blocks < self.needed:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.core(input_ids, labels)


def test_auto_checkpointing_sets_the_blocks_on_the_model_and_caches(tmp_path):
    from launcher.compose import compose_config, to_config

    cfg = to_config(compose_config(["trainer.micro_batch_size=2", "trainer.seq_len=16", "model.num_hidden_layers=6"]))
    core = DecoderLM(DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1))
    core.train()
    strategy = SingleDevice(Config(optim=OptimConfig(lr=1e-3)), torch.device("cpu"))
    model = OutOfMemoryWithFewCheckpoints(strategy.setup(core, lr=1e-3), needed=4)
    blocks = auto_batch.checkpointed_blocks_for_run(cfg, tmp_path, model, strategy, contextlib.nullcontext, 1)
    assert blocks == core.checkpointed_blocks == 4 and core.offload_checkpoints
    assert json.loads((tmp_path / auto_batch.CHECKPOINTING_CACHE).read_text())["size"] == 2  # blocks left whole
