"""Held-out loss and exact-match accuracy of greedy completions."""
from __future__ import annotations

import itertools

import torch

from launcher.data import Example, collate


@torch.no_grad()
def eval_loss(model, examples: list[Example], batch_size: int, pad_id: int, device, autocast) -> float:
    """Mean loss per target token over the examples (the training loss's definition)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        with autocast():
            loss_sum, n_targets = model(**batch)
        total += loss_sum.float()
        count += n_targets
    model.train(was_training)
    return (total / count.clamp(min=1)).item()


@torch.no_grad()
def exact_match(model, tokenizer, examples: list[Example], batch_size: int, device, autocast) -> float:
    """Fraction of examples whose greedy completion equals the target text exactly.

    Prompts of equal length are batched together, so no padding is needed.
    """
    was_training = model.training
    model.eval()
    by_length = itertools.groupby(sorted(examples, key=lambda ex: ex.prompt_len), key=lambda ex: ex.prompt_len)
    correct = 0
    for _, group in by_length:
        group = list(group)
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            completions = _greedy(model, tokenizer, [ex.input_ids[: ex.prompt_len] for ex in chunk],
                                  max(len(ex.input_ids) - ex.prompt_len for ex in chunk) + 2, device, autocast)
            correct += sum(text == ex.target for text, ex in zip(completions, chunk))
    model.train(was_training)
    return correct / max(1, len(examples))


def _greedy(model, tokenizer, prompts: list[list[int]], max_new: int, device, autocast) -> list[str]:
    ids = torch.tensor(prompts, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for _ in range(max_new):
        with autocast():
            next_ids = model.logits(ids)[:, -1].argmax(-1)
        next_ids = torch.where(done, tokenizer.eos_token_id, next_ids)  # filler after the end; cut below
        generated.append(next_ids)
        done |= next_ids == tokenizer.eos_token_id
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        if done.all():
            break
    rows = torch.stack(generated, dim=1).tolist()
    return [tokenizer.decode(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row,
                             skip_special_tokens=True) for row in rows]
