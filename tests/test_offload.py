"""trainer.activation_checkpointing=offload: checkpointed blocks' inputs wait in host memory.

Recomputation from an exact copy of the input must give bit-identical gradients to
plain checkpointing; on CUDA the device memory those inputs held must be free.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from kernels.dispatch import resolve_ops
from kernels.models import DecoderConfig, DecoderLM
from kernels.models import offload

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(layers=3, hidden=64) -> DecoderLM:
    config = DecoderConfig(model_type="llama", vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    ops = resolve_ops("triton" if DEVICE.type == "cuda" else "torch", DEVICE)
    return DecoderLM(config, ops).to(DEVICE).train()


def _grads(model, mode, input_ids, labels):
    model.zero_grad(set_to_none=True)
    model.set_activation_checkpointing(mode)
    loss_sum, n_tokens = model(input_ids, labels)
    (loss_sum / n_tokens).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _watch_host_copies(monkeypatch, record) -> None:
    """record(copy, tensor) for every host copy the offloader makes."""
    original = offload._HostCopy.__init__

    def watched(self, tensor, previous, stream):
        record(self, tensor)
        original(self, tensor, previous, stream)

    monkeypatch.setattr(offload._HostCopy, "__init__", watched)


def _ids(*shape):
    return torch.randint(0, 97, shape, device=DEVICE)


def test_offloaded_inputs_give_bit_identical_gradients(monkeypatch):
    monkeypatch.setattr(offload, "SMALLEST_PIECE_BYTES", 64)  # each input in pieces: 3072 = 2048 + 1024 elements
    model = _model()
    input_ids, labels = _ids(2, 24), _ids(2, 24)
    shapes = []
    _watch_host_copies(monkeypatch, lambda copy, tensor: shapes.append(tensor.shape))
    full = _grads(model, "full", input_ids, labels)
    assert shapes == []
    offloaded = _grads(model, "offload", input_ids, labels)
    assert shapes == [torch.Size([2, 24, 64])] * 3  # each block's input, nothing else (RoPE tables stay)
    for name, grad in full.items():
        assert torch.equal(offloaded[name], grad), name


@pytest.mark.parametrize("numel", [1, 3072, 2**20, 2**27 + 2**25 + 12345, 300_000 * 4096])
def test_host_copies_take_what_they_need_in_power_of_two_pieces(numel):
    """The host allocator rounds each block up to a power of two: pieces keep the waste under 1 MiB."""
    pieces = offload.power_of_two_pieces(numel, element_size=2)
    assert sum(pieces) == numel and pieces == sorted(pieces, reverse=True)
    allocated = sum(1 << (2 * n - 1).bit_length() for n in pieces)  # bytes, each piece rounded up
    assert allocated - 2 * numel < offload.SMALLEST_PIECE_BYTES


def test_nothing_keeps_an_offloaded_input_alive_on_its_device(monkeypatch):
    """After the forward pass only the host copies remain (the device memory is free to reuse)."""
    model = _model()
    model.set_activation_checkpointing("offload")
    inputs = []
    _watch_host_copies(monkeypatch, lambda copy, tensor: inputs.append(weakref.ref(tensor)))
    loss_sum, _ = model(_ids(2, 24), _ids(2, 24))
    gc.collect()
    assert len(inputs) == 3 and all(ref() is None for ref in inputs)
    loss_sum.backward()


def test_host_copies_are_released_after_backward(monkeypatch):
    """Nothing of a step outlives its backward pass (by reference counting alone: no cycle waits for a GC)."""
    model = _model()
    model.set_activation_checkpointing("offload")
    copies = []
    _watch_host_copies(monkeypatch, lambda copy, tensor: copies.append(weakref.ref(copy)))
    for _ in range(2):
        loss_sum, _ = model(_ids(2, 24), _ids(2, 24))
        loss_sum.backward()
        del loss_sum
    assert len(copies) == 6 and all(ref() is None for ref in copies)


def test_evaluation_offloads_nothing(monkeypatch):
    model = _model()
    model.set_activation_checkpointing("offload")
    monkeypatch.setattr(offload._HostCopy, "__init__", lambda *a: pytest.fail("copied without autograd"))
    with torch.no_grad():
        model(_ids(1, 8), _ids(1, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="device memory is measured on CUDA")
def test_offload_frees_the_device_memory_of_the_block_inputs():
    """What the forward pass leaves on the device for backward: every block input, or none of them."""
    layers, batch, seq, hidden = 8, 4, 1024, 256
    model = _model(layers, hidden).to(torch.bfloat16)
    input_ids = torch.randint(0, 97, (batch, seq), device=DEVICE)
    held = {}
    for mode in ("full", "offload"):
        model.set_activation_checkpointing(mode)
        _grads(model, mode, input_ids, input_ids)  # warm-up: the Triton compilations and pinned buffers
        model.zero_grad(set_to_none=True)
        loss_sum, _ = model(input_ids, input_ids)
        torch.cuda.synchronize()  # the copies to the host are done ...
        torch.empty(1, device=DEVICE)  # ... and the allocator retires their sources at its next allocation
        held[mode] = torch.cuda.memory_allocated()
        loss_sum.backward()
    block_input = batch * seq * hidden * 2  # bf16
    assert held["offload"] <= held["full"] - (layers - 1) * block_input, held
