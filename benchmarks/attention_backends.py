"""Which SDPA backend the model core should ask for: forward + backward time per backend.

The 1B and 8B benchmark shapes (GQA: 32 query heads, 8 key/value heads, head dim 128,
seq 2048, causal, bf16), laid out as the core calls SDPA ([B, T, H, d] transposed).
Backends that cannot take GQA directly get key/value repeated to 32 heads first,
and that copy is inside their time. Each backend's output and gradients are compared
with flash's. Results: $OUT/attention_backends.json.

usage: python benchmarks/attention_backends.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"1b": (8, 32, 8, 2048, 64), "8b": (4, 32, 8, 2048, 128)}  # batch, heads, kv heads, seq, head dim


def attention(q, k, v, backend, gqa_native):
    if not gqa_native:
        repeat = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=gqa_native)
    return out.transpose(1, 2)


def timed(fn, repeats=20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    rows = []
    for name, (B, H, K, T, d) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        k = torch.randn(B, T, K, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        v = torch.randn(B, T, K, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        dout = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, generator=g)
        results = {}
        for label, backend, gqa_native in (("flash", SDPBackend.FLASH_ATTENTION, True),
                                           ("cudnn", SDPBackend.CUDNN_ATTENTION, True),
                                           ("cudnn_repeat_kv", SDPBackend.CUDNN_ATTENTION, False),
                                           ("efficient_repeat_kv", SDPBackend.EFFICIENT_ATTENTION, False)):
            def step():
                q.grad = k.grad = v.grad = None
                out = attention(q, k, v, backend, gqa_native)
                out.backward(dout)
                return out

            try:
                out = step()
                ms = timed(step)
                forward_ms = timed(lambda: attention(q.detach(), k.detach(), v.detach(), backend, gqa_native))
            except RuntimeError as err:
                rows.append({"shape": name, "backend": label, "error": str(err).splitlines()[0][:300]})
                print(f"{name} {label}: unavailable ({rows[-1]['error'][:120]})", flush=True)
                continue
            results[label] = [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]
            flops = 4 * B * H * T * T * d / 2 * 3.5  # causal; backward ~2.5x forward
            row = {"shape": name, "backend": label, "fwd_bwd_ms": ms, "fwd_ms": forward_ms,
                   "tflops_fwd_bwd": flops / ms / 1e9, "device": torch.cuda.get_device_name(),
                   "torch": torch.__version__}
            if "flash" in results and label != "flash":
                row["max_abs_diff_vs_flash"] = max(float((a - b).abs().max())
                                                   for a, b in zip(results[label], results["flash"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(os.environ.get("OUT", "/tmp"))
    (out / "attention_backends.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
