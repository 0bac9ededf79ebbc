"""Activation offloading: checkpointed blocks keep their saved input in pinned host memory.

With activation checkpointing each block keeps one tensor for backward, its input
[B, T, D]; for Llama-3-8B at 4 x 2048 tokens in bf16 that is 64 MiB a block, 2 GiB over
32 blocks. Offloading copies each input to pinned host memory on a side stream while
the next blocks compute, and in backward copies block i-1's input back while block i
recomputes, so the transfers (about 3 ms per 64 MiB over PCIe Gen5) hide behind compute.

torch.utils.checkpoint (non-reentrant) stores a block's inputs as saved tensors of the
outer graph, so a `saved_tensors_hooks` pair around the checkpoint call sees them, and
only them: the checkpoint's own hooks take every tensor saved inside the block. The
hooks offload just the residual stream; RoPE tables and masks are shared by all blocks
and stay where they are.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch

_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


# The caching host allocator rounds each pinned block up to a power of two: one 2.3 GiB block
# input (Llama-3-8B at 300k tokens) would take 4 GiB, and 32 of them more than the host has.
# Stored as power-of-two pieces, a tensor takes what it needs to within this many bytes.
SMALLEST_PIECE_BYTES = 1 << 20


def power_of_two_pieces(numel: int, element_size: int) -> list[int]:
    """numel as a sum of powers of two, largest first, the last piece under SMALLEST_PIECE_BYTES any length."""
    pieces, rest = [], numel
    while rest * element_size > SMALLEST_PIECE_BYTES:
        pieces.append(1 << (rest.bit_length() - 1))
        rest -= pieces[-1]
    return pieces + [rest] if rest else pieces


class _HostCopy:
    """One offloaded tensor: its host copy and, once prefetched, the device copy in flight.

    Holds the previous entry (not the offloader), so fetching one can prefetch the one
    backward needs next without a reference cycle keeping pinned buffers alive.
    """

    def __init__(self, tensor: torch.Tensor, previous: _HostCopy | None, stream: torch.cuda.Stream | None):
        self.device, self.shape, self.dtype = tensor.device, tensor.shape, tensor.dtype
        self.previous, self.stream = previous, stream
        self.lengths = power_of_two_pieces(tensor.numel(), tensor.element_size())
        self.host = [torch.empty(n, dtype=tensor.dtype, pin_memory=stream is not None) for n in self.lengths]
        self.on_device: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        flat = tensor.reshape(-1)
        if stream is None:  # CPU tensors: plain copies (the path the CPU tests take)
            self._copy(flat, to_host=True)
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is written
        with torch.cuda.stream(stream):
            self._copy(flat, to_host=True)
        flat.record_stream(stream)  # its memory is not reused before the copies have read it

    def _copy(self, flat: torch.Tensor, to_host: bool) -> None:
        for piece, chunk in zip(self.host, flat.split(self.lengths)):
            target, source = (piece, chunk) if to_host else (chunk, piece)
            target.copy_(source, non_blocking=True)

    def prefetch(self) -> None:
        """Start the copy back on the side stream (after the copy out, which ran there first)."""
        if self.stream is None or self.on_device is not None:
            return
        with torch.cuda.stream(self.stream):
            self.on_device = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self._copy(self.on_device.view(-1), to_host=False)
            self.ready = self.stream.record_event()

    def fetch(self) -> torch.Tensor:
        """The tensor on its device, ready for the compute stream; starts fetching the previous one."""
        if self.stream is None:
            return torch.cat(self.host).view(self.shape)
        self.prefetch()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self.ready)
        tensor, self.on_device = self.on_device, None
        tensor.record_stream(compute)  # allocated on the side stream, used and freed on this one
        if self.previous is not None:
            self.previous.prefetch()
        return tensor


class HostOffloader:
    """The offloaded block inputs of one forward pass, in order (backward fetches them in reverse)."""

    def __init__(self, device: torch.device):
        self.stream = _side_stream(device) if device.type == "cuda" else None
        self.last: _HostCopy | None = None

    @contextlib.contextmanager
    def saving(self, tensor: torch.Tensor) -> Iterator[None]:
        """Inside, `tensor` goes to host memory if autograd saves it; other saved tensors stay."""
        # Autograd keeps the pack hook as long as the graph: a strong reference here would
        # keep the very device memory this frees.
        target = weakref.ref(tensor)

        def pack(saved: torch.Tensor):
            if saved is not target():
                return saved
            self.last = _HostCopy(saved, self.last, self.stream)
            return self.last

        def unpack(packed):
            return packed.fetch() if isinstance(packed, _HostCopy) else packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
