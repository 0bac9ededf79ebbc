"""Loss = sum of token losses / target tokens of the whole step, however the step is split.

Variable-length, padded sequences with different numbers of targets make a
per-micro-batch mean visibly wrong; the last test shows it would be caught.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kernels.models import DecoderConfig, DecoderLM
from kernels.reference import IGNORE_INDEX
from launcher.config import Config
from launcher.data import Example, collate
from launcher.loop import Precision, train_step
from strategies.single import SingleDevice

PAD = 0


class GradCapture(SingleDevice):
    """Records the gradients the optimizer is about to apply."""

    def step(self, grad_clip: float, loss: torch.Tensor | None = None) -> torch.Tensor:
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}
        return super().step(grad_clip, loss)


def make_examples(n: int = 8) -> list[Example]:
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(n):
        length = 3 + 3 * i  # 3..24 tokens: very different target counts per micro-batch
        ids = torch.randint(1, 50, (length + 1,), generator=gen).tolist()
        prompt_len = length // 3
        labels = [IGNORE_INDEX] * (prompt_len - 1) + ids[prompt_len:]
        examples.append(Example("", "", ids[:-1], labels, prompt_len))
    return examples


@pytest.fixture(scope="module")
def initial_model() -> DecoderLM:
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    return DecoderLM(config)


def run_one_step(initial_model, micro_batch_size: int, backward=None) -> tuple[float, dict]:
    strategy = GradCapture(Config(), torch.device("cpu"))
    if backward:
        strategy.backward = backward
    model = strategy.setup(copy.deepcopy(initial_model), lr=1e-3)
    examples = make_examples()
    micro_batches = [collate(examples[i : i + micro_batch_size], PAD)
                     for i in range(0, len(examples), micro_batch_size)]
    loss, _, _ = train_step(model, strategy, micro_batches, Precision.resolve("fp32", torch.device("cpu")), PAD,
                            grad_clip=0.0)
    return loss.item(), strategy.grads


def full_batch_reference(initial_model) -> float:
    """The definition, computed directly: every target token of the step weighs the same."""
    batch = collate(make_examples(), PAD)
    loss_sum, n_targets = copy.deepcopy(initial_model)(**batch)
    return (loss_sum / n_targets).item()


@pytest.mark.parametrize("micro_batch_size", [1, 2, 8], ids=["1x8", "2x4", "8x1"])
def test_loss_and_gradients_do_not_depend_on_accumulation(initial_model, micro_batch_size):
    ref_loss, ref_grads = run_one_step(initial_model, micro_batch_size=8)
    loss, grads = run_one_step(initial_model, micro_batch_size)
    assert loss == pytest.approx(full_batch_reference(initial_model), rel=1e-6)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_per_micro_batch_mean_would_be_caught(initial_model):
    """Negative control: averaging micro-batch means changes the gradients on this data."""
    accumulation = 4

    def per_micro_mean(loss_sum: torch.Tensor, global_targets: torch.Tensor) -> None:
        # What the classic bug does: each micro-batch normalised by its own target count.
        n_micro = per_micro_mean.counts.pop(0)
        (loss_sum / n_micro / accumulation).backward()

    examples = make_examples()
    per_micro_mean.counts = [sum(l != IGNORE_INDEX for ex in examples[i : i + 2] for l in ex.labels)
                             for i in range(0, 8, 2)]
    _, ref_grads = run_one_step(initial_model, micro_batch_size=8)
    _, wrong_grads = run_one_step(initial_model, micro_batch_size=2, backward=per_micro_mean)
    worst = max((wrong_grads[n] - ref_grads[n]).abs().max().item() / ref_grads[n].abs().max().item()
                for n in ref_grads if ref_grads[n].abs().max() > 0)
    assert worst > 1e-2
