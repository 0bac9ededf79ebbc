"""The order of the training sequences and their batches, independent of the world size."""
from __future__ import annotations

import torch

from kernels.reference import IGNORE_INDEX
from launcher.data.sequences import Example, PackedSequence


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
