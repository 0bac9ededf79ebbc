"""Triton ops vs their pure-PyTorch twins (kernels.reference): outputs and every gradient.

On CUDA the kernels run compiled, in float32 and bfloat16. Without CUDA they run in
Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), float32 only:
the interpreter gets bf16 arithmetic wrong. Shapes are small and odd on purpose (few
programs, tails that need masks).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from kernels import ops, reference  # noqa: E402

# The submodules share names with the functions `kernels.ops` exports.
lce_module = importlib.import_module("kernels.ops.linear_cross_entropy")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rtol, atol) for outputs and gradients.
TOLERANCE = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(
        torch.bfloat16,
        id="bf16",
        marks=pytest.mark.skipif(
            DEVICE != "cuda", reason="bf16 arithmetic is wrong in Triton's CPU interpreter; runs on CUDA"
        ),
    ),
]


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _assert_close(actual, expected, dtype, what):
    assert actual is not None and expected is not None, f"{what}: a gradient is missing"
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _run(fn, inputs, upstream):
    """fn(*leaves) on fresh leaf copies; backward of sum(out * upstream) over outputs."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * u.float()).sum() for o, u in zip(outs, upstream) if u is not None)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves if t.requires_grad]


def _compare(triton_fn, reference_fn, inputs, upstream, dtype):
    outs, grads = _run(triton_fn, inputs, upstream)
    ref_outs, ref_grads = _run(reference_fn, inputs, upstream)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        _assert_close(a, b, dtype, f"output {i}")
    assert len(grads) == len(ref_grads)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        _assert_close(a, b, dtype, f"grad {i}")


def test_interpreter_is_on_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py should have set TRITON_INTERPRET=1"


# ---------------------------------------------------------------------------- RMSNorm

RMS_CASES = [
    pytest.param((3, 5, 48), 0.0, id="BTD-48"),
    pytest.param((37, 100), 1.0, id="rows37-100-gemma"),
    pytest.param((2, 4096), 0.0, id="long-row-4096"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,offset", RMS_CASES)
def test_rms_norm(shape, offset, dtype):
    x = _randn(*shape, dtype=dtype, seed=1).requires_grad_()
    w = (1.0 + _randn(shape[-1], dtype=dtype, scale=0.1, seed=2)).requires_grad_()
    up = _randn(*shape, dtype=dtype, seed=3)
    _compare(
        lambda x, w: ops.rms_norm(x, w, 1e-6, offset),
        lambda x, w: reference.rms_norm(x, w, 1e-6, offset),
        [x, w], [up], dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_frozen_weight_strided_input(dtype):
    base = _randn(4, 7, 160, dtype=dtype, seed=4)
    x = base[..., :100].requires_grad_()  # row-strided view
    w = _randn(100, dtype=dtype, seed=5)
    up = _randn(4, 7, 100, dtype=dtype, seed=6)
    _compare(lambda x, w: ops.rms_norm(x, w, 1e-5), lambda x, w: reference.rms_norm(x, w, 1e-5), [x, w], [up], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,offset", RMS_CASES[:2])
@pytest.mark.parametrize("used", ["both", "normed", "summed"])
def test_add_rms_norm(shape, offset, used, dtype):
    res = _randn(*shape, dtype=dtype, seed=7).requires_grad_()
    x = _randn(*shape, dtype=dtype, seed=8).requires_grad_()
    w = (1.0 + _randn(shape[-1], dtype=dtype, scale=0.1, seed=9)).requires_grad_()
    up_s = _randn(*shape, dtype=dtype, seed=10) if used in ("both", "summed") else None
    up_n = _randn(*shape, dtype=dtype, seed=11) if used in ("both", "normed") else None
    outs, grads = _run(lambda r, x, w: ops.add_rms_norm(r, x, w, 1e-6, offset), [res, x, w], [up_s, up_n])
    ref_outs, ref_grads = _run(lambda r, x, w: reference.add_rms_norm(r, x, w, 1e-6, offset), [res, x, w], [up_s, up_n])
    for i in range(2):
        _assert_close(outs[i], ref_outs[i], dtype, f"output {i}")
    for name, a, b in zip(["residual", "x", "weight"], grads, ref_grads):
        if used == "summed" and name == "weight":  # no path to the weight: reference leaves None
            assert a is None and b is None
            continue
        _assert_close(a, b, dtype, f"grad {name}")
    # the residual and x gradients must be separate buffers (both are leaves here)
    assert grads[0].data_ptr() != grads[1].data_ptr()


# ------------------------------------------------------------------------------- RoPE


def _llama_tables(batch, seq, head_dim, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None].expand(batch, -1, -1).to(DEVICE), emb.sin()[None].expand(batch, -1, -1).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 24])
@pytest.mark.parametrize("tables", ["llama", "random-B", "random-1"])
def test_apply_rope_gqa(head_dim, tables, dtype):
    B, T, n_q, n_k = 2, 3, 4, 2
    q = _randn(B, T, n_q, head_dim, dtype=dtype, seed=12).requires_grad_()
    k = _randn(B, T, n_k, head_dim, dtype=dtype, seed=13).requires_grad_()
    if tables == "llama":
        cos, sin = _llama_tables(B, T, head_dim)
    else:  # arbitrary tables (c1 != c2): checks the exact transpose in the backward
        lead = B if tables == "random-B" else 1
        cos, sin = _randn(lead, T, head_dim, seed=14), _randn(lead, T, head_dim, seed=15)
    up_q = _randn(B, T, n_q, head_dim, dtype=dtype, seed=16)
    up_k = _randn(B, T, n_k, head_dim, dtype=dtype, seed=17)
    _compare(
        lambda q, k: ops.apply_rope(q, k, cos, sin),
        lambda q, k: reference.apply_rope(q, k, cos, sin),
        [q, k], [up_q, up_k], dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rope_fused_qkv_views(dtype):
    """q/k as strided slices of one fused projection output; inputs stay untouched."""
    B, T, n_q, n_k, head_dim = 1, 5, 4, 2, 24
    qkv = _randn(B, T, (n_q + 2 * n_k) * head_dim, dtype=dtype, seed=18).requires_grad_()
    cos, sin = _llama_tables(B, T, head_dim)
    up_q = _randn(B, T, n_q, head_dim, dtype=dtype, seed=19)
    up_k = _randn(B, T, n_k, head_dim, dtype=dtype, seed=20)

    def split(qkv):
        heads = qkv.view(B, T, n_q + 2 * n_k, head_dim)
        return heads[:, :, :n_q], heads[:, :, n_q : n_q + n_k]

    before = qkv.detach().clone()
    _compare(
        lambda qkv: ops.apply_rope(*split(qkv), cos, sin),
        lambda qkv: reference.apply_rope(*split(qkv), cos, sin),
        [qkv], [up_q, up_k], dtype,
    )
    q, k = split(qkv.detach())
    assert not q.is_contiguous()
    ops.apply_rope(q, k, cos, sin)
    assert torch.equal(qkv.detach(), before)


# ----------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 100), (2, 1100)], ids=["BTD-48", "rows7-100", "cols1100"])
def test_swiglu(shape, dtype):
    gate = _randn(*shape, dtype=dtype, scale=2.0, seed=21).requires_grad_()
    up = _randn(*shape, dtype=dtype, seed=22).requires_grad_()
    upstream = _randn(*shape, dtype=dtype, seed=23)
    _compare(ops.swiglu, reference.swiglu, [gate, up], [upstream], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_fused_gate_up_view(dtype):
    gate_up = _randn(3, 4, 200, dtype=dtype, seed=24).requires_grad_()
    upstream = _randn(3, 4, 100, dtype=dtype, seed=25)
    _compare(
        lambda gu: ops.swiglu(*gu.chunk(2, dim=-1)),
        lambda gu: reference.swiglu(*gu.chunk(2, dim=-1)),
        [gate_up], [upstream], dtype,
    )


def _swiglu_linear_inputs(shape, out_features, dtype, weight_dtype=None):
    gate = _randn(*shape, dtype=dtype, scale=2.0, seed=26).requires_grad_()
    up = _randn(*shape, dtype=dtype, seed=27).requires_grad_()
    weight = _randn(out_features, shape[-1], dtype=weight_dtype or dtype, scale=0.1, seed=28).requires_grad_()
    return [gate, up, weight], _randn(*shape[:-1], out_features, dtype=dtype, seed=29)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_trained", [True, False], ids=["trained", "frozen"])
@pytest.mark.parametrize("shape,out_features", [((3, 5, 48), 37), ((2, 1100), 9)], ids=["BTD-48", "cols1100"])
def test_swiglu_linear(shape, out_features, weight_trained, dtype):
    inputs, upstream = _swiglu_linear_inputs(shape, out_features, dtype)
    inputs[2].requires_grad_(weight_trained)
    _compare(ops.swiglu_linear, reference.swiglu_linear, inputs, [upstream], dtype)


def test_swiglu_linear_unread_output_gives_the_same_gradients():
    """output_read=False (a checkpointed block's recomputation): a placeholder, and backward unchanged."""
    inputs, upstream = _swiglu_linear_inputs((3, 5, 48), 37, torch.float32)
    grads = []
    for output_read in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = ops.swiglu_linear(*leaves, output_read=output_read)
        grads.append(torch.autograd.grad(out, leaves, upstream))
    assert out.shape == (3, 5, 37) and out.stride() == (0, 0, 0)
    for read, unread in zip(*grads):
        torch.testing.assert_close(unread, read, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 autocast needs CUDA (the interpreter's bf16 is wrong)")
def test_swiglu_linear_under_bf16_autocast():
    """fp32 master weight, bf16 activations: bf16 output, fp32 weight gradient, as nn.Linear gives."""
    inputs, upstream = _swiglu_linear_inputs((4, 7, 200), 48, torch.bfloat16, weight_dtype=torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _compare(ops.swiglu_linear, reference.swiglu_linear, inputs, [upstream], torch.bfloat16)


# --------------------------------------------------------------- linear cross-entropy

N_TOK, HID, VOCAB = 37, 48, 257


@pytest.fixture
def small_chunks(monkeypatch):
    """8-row chunks (5 chunks for 37 tokens, the last partial) and 64-wide vocab tiles."""
    monkeypatch.setattr(lce_module, "LOGITS_CHUNK_BYTES", 8 * VOCAB * 4)
    monkeypatch.setattr(lce_module, "_BLOCK_V", 64)


def _labels(pattern, seed=26, n=N_TOK, ignore_index=reference.IGNORE_INDEX):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (n,), generator=g)
    if pattern == "some-ignored":
        labels[::3] = ignore_index
        labels[8:16] = ignore_index  # a whole 8-row chunk is ignored
        labels[-1] = VOCAB - 1  # the last vocabulary entry (tail tile)
    elif pattern == "all-ignored":
        labels[:] = ignore_index
    return labels.to(DEVICE)


def _lce_compare(dtype, labels, h_grad=True, w_grad=True, ignore_index=reference.IGNORE_INDEX, scale=0.37):
    hidden = _randn(labels.shape[0], HID, dtype=dtype, seed=27).requires_grad_(h_grad)
    weight = _randn(VOCAB, HID, dtype=dtype, scale=0.3, seed=28).requires_grad_(w_grad)

    def fn(impl):
        def run(h, w):
            loss_sum, n_tokens = impl(h, w, labels, ignore_index)
            return loss_sum, n_tokens

        return run

    upstream = [torch.tensor(scale, device=DEVICE), None]
    outs, grads = _run(fn(ops.linear_cross_entropy), [hidden, weight], upstream)
    ref_outs, ref_grads = _run(fn(reference.linear_cross_entropy), [hidden, weight], upstream)
    _assert_close(outs[0], ref_outs[0], dtype, "loss_sum")
    assert outs[0].dtype == torch.float32 and outs[0].dim() == 0
    assert outs[1].dtype == torch.int64 and int(outs[1]) == int(ref_outs[1])
    assert len(grads) == len(ref_grads) == int(h_grad) + int(w_grad)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        _assert_close(a, b, dtype, f"grad {i}")
    return outs, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("pattern", ["none-ignored", "some-ignored"])
def test_linear_cross_entropy(pattern, chunked, dtype, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    _lce_compare(dtype, _labels(pattern))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_all_ignored(dtype, small_chunks):
    outs, grads = _lce_compare(dtype, _labels("all-ignored"))
    assert float(outs[0]) == 0.0 and int(outs[1]) == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_grad,w_grad", [(True, False), (False, True)], ids=["frozen-weight", "frozen-hidden"])
def test_linear_cross_entropy_partial_grads(h_grad, w_grad, dtype, small_chunks):
    _lce_compare(dtype, _labels("some-ignored"), h_grad=h_grad, w_grad=w_grad)


def test_linear_cross_entropy_custom_ignore_index(small_chunks):
    _lce_compare(torch.float32, _labels("some-ignored", ignore_index=-1), ignore_index=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_tied_weight(dtype, small_chunks):
    """Weight used as embedding and lm_head: its gradient sums both uses."""
    g = torch.Generator().manual_seed(29)
    tokens = torch.randint(0, VOCAB, (N_TOK,), generator=g).to(DEVICE)
    labels = _labels("some-ignored")
    weight = _randn(VOCAB, HID, dtype=dtype, scale=0.3, seed=30).requires_grad_()

    def fn(impl):
        def run(w):
            hidden = F.embedding(tokens, w) * 2.0
            return impl(hidden, w, labels)

        return run

    upstream = [torch.tensor(0.5, device=DEVICE), None]
    outs, grads = _run(fn(ops.linear_cross_entropy), [weight], upstream)
    ref_outs, ref_grads = _run(fn(reference.linear_cross_entropy), [weight], upstream)
    _assert_close(outs[0], ref_outs[0], dtype, "loss_sum")
    _assert_close(grads[0], ref_grads[0], dtype, "grad weight")


def test_linear_cross_entropy_no_grad_matches(small_chunks):
    labels = _labels("some-ignored")
    hidden = _randn(N_TOK, HID, seed=31).requires_grad_()
    weight = _randn(VOCAB, HID, scale=0.3, seed=32).requires_grad_()
    with torch.no_grad():
        loss, n = ops.linear_cross_entropy(hidden, weight, labels)
        ref_loss, ref_n = reference.linear_cross_entropy(hidden, weight, labels)
    _assert_close(loss, ref_loss, torch.float32, "loss_sum")
    assert int(n) == int(ref_n)


@pytest.mark.skipif(DEVICE != "cpu", reason="a device-side assert would poison the CUDA context")
def test_linear_cross_entropy_rejects_out_of_range_label():
    labels = _labels("none-ignored")
    labels[3] = VOCAB
    with pytest.raises(RuntimeError, match="outside"):
        ops.linear_cross_entropy(_randn(N_TOK, HID, seed=33), _randn(VOCAB, HID, seed=34), labels)


# ---------------------------------------------------- compiled for Hopper, from a CPU


def _hopper_cases():
    rms = importlib.import_module("kernels.ops.rms_norm")
    rope = importlib.import_module("kernels.ops.rope")
    swiglu = importlib.import_module("kernels.ops.swiglu")
    bf, f32 = "bf16", "fp32"
    rms_bwd_ptrs = dict(DY=bf, X=bf, W=bf, RSTD=f32, DS=bf, DX=bf, DX2=bf, DW_PARTIAL=f32)
    rope_ptrs = dict(COS=f32, SIN=f32)
    rope_blocks = dict(BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64)  # Llama-3-8B: 32 q heads, 8 kv heads, Dh 128
    return [
        (rms._rms_norm_fwd_kernel, dict(X=bf, R=bf, S=bf, W=bf, Y=bf, RSTD=f32),
         dict(HAS_RESIDUAL=True, BLOCK_D=4096), 8),
        (rms._rms_norm_bwd_kernel, rms_bwd_ptrs, dict(HAS_DS=True, HAS_DX2=True, COMPUTE_DW=True, BLOCK_D=4096), 8),
        (rope._rope_fwd_kernel, dict(Q=bf, K=bf, QO=bf, KO=bf, **rope_ptrs), rope_blocks, 8),
        (rope._rope_bwd_kernel, dict(DQO=bf, DKO=bf, DQ=bf, DK=bf, **rope_ptrs), rope_blocks, 8),
        (swiglu._swiglu_fwd_kernel, dict(G=bf, U=bf, O=bf), dict(BLOCK=1024), 4),
        (swiglu._swiglu_bwd_kernel, dict(DO=bf, G=bf, U=bf, DG=bf, DU=bf, H=bf), dict(BLOCK=1024, STORE_H=True), 4),
        (lce_module._linear_cross_entropy_fwd_kernel, dict(LOGITS=bf, LABELS="i64", LOSS=f32),
         dict(COMPUTE_GRAD=True, BLOCK_V=4096), 8),
        (lce_module._linear_cross_entropy_bwd_kernel, dict(GRAD=bf, SCALE=f32), dict(BLOCK=4096), 8),
    ]


def compile_all_for_sm90() -> list[str]:
    """Compile each case to a Hopper cubin; returns the kernel names. Needs compiled
    (not interpreted) Triton, so the test below runs it in a fresh process."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    float_args = {"eps", "offset"}
    names = []
    for kernel, ptrs, constexprs, num_warps in _hopper_cases():
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ptrs:
                signature[name] = "*" + ptrs[name]
            else:
                signature[name] = "fp32" if name in float_args else "i32"
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": num_warps},
        )
        assert compiled.asm.get("cubin"), kernel.__name__
        names.append(kernel.__name__)
    return names


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the kernels compile and run in the tests above")
def test_bf16_kernels_compile_for_sm90():
    """Compile every kernel's bf16 variant to an sm_90 cubin (Triton's bundled ptxas), no GPU needed.

    The interpreter runs the kernels as Python and never invokes the compiler: this
    catches what only compiled Triton rejects (loop-carried type changes, layouts,
    constexpr misuse) on a CPU-only machine.
    """
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"Triton's CUDA backend is not installed: {exc}")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    code = "import test_ops; print(' '.join(test_ops.compile_all_for_sm90()))"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(result.stdout.split()) == len(_hopper_cases())
