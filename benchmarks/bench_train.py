"""Training throughput on one GPU: HF transformers (SDPA), HF + Liger-Kernel, Slipstream.

Same shapes, same random token ids, same optimizer (fused AdamW, lr 1e-5, weight
decay 0.01, betas 0.9/0.999) and the same gradient clipping (max norm 1.0) for all
three systems. Each (workload, system) pair runs in its own subprocess, so memory
statistics and Liger's monkey patches do not leak between rows.

Per row: reset_peak_memory_stats after the model and optimizer are built (before
warm-up), `--warmup` steps, synchronize, `--steps` timed steps, synchronize.
tokens/s = micro_batch * seq * steps / time; peak = max_memory_allocated over
warm-up + timed steps (so it includes the optimizer states made at the first step).
MFU = model FLOPs per token * tokens/s / the device's peak dense bf16 FLOP/s, and
also against an 8192^3 bf16 matmul measured in the same run. See benchmarks/README.md.

usage:
  python benchmarks/bench_train.py [--workloads 1b-full,1b-full-ckpt] [--systems slipstream,liger,hf]
                                   [--lora] [--tests] [--profile] [--steps 10] [--warmup 3]
  python benchmarks/bench_train.py --smoke      # tiny shapes on CPU, seconds, no GPU needed
Results: $OUT/bench_train.json (or --out DIR), one JSON list of rows, rewritten after every row.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
LR = 1e-5
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which the HF rows use as anchors.py does
BETAS = (0.9, 0.999)
EPS = 1e-8
GRAD_CLIP = 1.0  # the same max norm for all three systems (Slipstream's loop always clips)

MODELS = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
               rope_theta=500000.0, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
               rope_theta=500000.0, tie_word_embeddings=False),
    # --smoke: seconds on a CPU; exercises every code path except the GPU kernels
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=500000.0, tie_word_embeddings=True),
}

class Workload(NamedTuple):
    model: str
    mode: str  # full | lora | qlora
    micro_batch: int
    seq: int
    checkpointing: str  # trainer.activation_checkpointing: none | full | offload | auto
    memory_budget_gib: float = 0.0  # checkpointing=auto: trainer.memory_budget_gib


WORKLOADS = {
    "1b-full": Workload("1b", "full", 8, 2048, "none"),
    "1b-full-ckpt": Workload("1b", "full", 8, 2048, "full"),
    "8b-lora": Workload("8b", "lora", 4, 2048, "full"),
    "8b-qlora": Workload("8b", "qlora", 4, 2048, "full"),
    # Slipstream only (the peers have no such mode; Unsloth's own checkpointing offloads too)
    "8b-lora-offload": Workload("8b", "lora", 4, 2048, "offload"),
    "8b-qlora-offload": Workload("8b", "qlora", 4, 2048, "offload"),
    "8b-lora-auto24": Workload("8b", "lora", 4, 2048, "auto", 24.0),  # issue 8's 24 GiB ceiling
    "tiny-full": Workload("tiny", "full", 2, 64, "none"),
    "tiny-full-ckpt": Workload("tiny", "full", 2, 64, "full"),
    "tiny-lora": Workload("tiny", "lora", 2, 64, "full"),
    "tiny-qlora": Workload("tiny", "qlora", 2, 64, "full"),
    "tiny-lora-offload": Workload("tiny", "lora", 2, 64, "offload"),
}
SLIPSTREAM_ONLY = ("offload", "auto")  # checkpointing modes the HF rows cannot reproduce
SYSTEMS = ("slipstream", "liger", "hf")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- FLOPs


def flop_counts(model_key: str, mode: str, seq: int, recomputed: float) -> dict:
    """Per-token FLOPs, as anchors.py counts them.

    dense = non-embedding params + lm_head (the embedding lookup is no matmul; a tied
    lm_head is counted once, as a matmul). Full training: 6 * dense + 12 * L * d * seq
    (attention scores and values, forward + backward, causal mask *not* halved). LoRA:
    the frozen base still needs forward (2N) and input gradients (2N): 4 * dense +
    8 * L * d * seq; the adapters' own FLOPs are left out. `hw` adds what activation
    checkpointing recomputes (one more forward of the `recomputed` share of the blocks:
    2 * dense + 4 * L * d * seq for all of them).
    """
    c = MODELS[model_key]
    d, L, V, f = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
    dense = L * per_layer + d + V * d  # blocks + final norm + lm_head
    attn = 12 * L * d * seq
    if mode == "full":
        model = 6 * dense + attn
    else:
        model = 4 * dense + attn * 2 / 3
    hw = model + recomputed * (2 * dense + attn / 3)
    return {"dense_params": dense, "model_flops_per_token": model, "hw_flops_per_token": hw}


def peak_bf16(device_name: str, override_tflops: float | None) -> float | None:
    """Peak dense bf16 FLOP/s: --peak-tflops, else the launcher's data-sheet table (launcher/flops.py)."""
    if override_tflops:
        return override_tflops * 1e12
    from launcher.flops import peak_tflops

    tflops = peak_tflops(device_name)
    return tflops * 1e12 if tflops else None


# ----------------------------------------------------------------------------- children


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for key, dist in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                      ("liger_kernel", "liger-kernel"), ("peft", "peft")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    return out


def _device(args):
    import torch

    if args.smoke and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --smoke for the CPU check)")
    return torch.device("cuda")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _make_batch(vocab: int, mb: int, seq: int, device):
    """The same random token ids for every system (seed 1); Slipstream gets the shifted labels."""
    import torch

    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, vocab, (mb, seq), device=device, generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]  # labels[t] = the token after t; the last position has no target
    return ids, labels


def build_hf(system: str, workload: str, device, smoke: bool):
    """(step function, model, n_params) for the HF and HF + Liger rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = WORKLOADS[workload]
    if system == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    cfg = LlamaConfig(**MODELS[spec.model], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.train()
    if spec.checkpointing == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                            fused=device.type == "cuda")
    ids, _ = _make_batch(cfg.vocab_size, spec.micro_batch, spec.seq, device)

    def step():
        # labels=ids: transformers shifts them itself (same targets as Slipstream's labels)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss  # no host sync, as anchors.py

    return step, model, n_params


def build_slipstream(spec: Workload, device, kernels: str):
    """The real training path: DecoderLM + resolve_ops + SingleDevice + launcher.loop.train_step.

    Returns (step function, model, n_params, ops name, checkpointed blocks).
    """
    import torch

    from kernels.dispatch import resolve_ops
    from kernels.models import DecoderConfig, DecoderLM
    from launcher import auto_batch
    from launcher.config import Config, OptimConfig, TrainerConfig
    from launcher.loop import Precision, train_step
    from strategies.single import SingleDevice

    precision = Precision.resolve("bf16", device)  # pure bf16 parameters, no autocast
    ops = resolve_ops(kernels, device)
    config = DecoderConfig(model_type="llama", **MODELS[spec.model])
    torch.manual_seed(0)
    with torch.device(device):
        model = DecoderLM(config, ops=ops)
    model = model.to(device=device, dtype=precision.param_dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if spec.mode != "full":  # peft's LoraConfig(r=16, lora_alpha=16, lora_dropout=0) on the seven projections
        from launcher.config import PeftConfig
        from launcher.model_factory import add_adapters, resolved_peft

        model = add_adapters(model, resolved_peft(PeftConfig(method=spec.mode, r=16, lora_alpha=16, lora_dropout=0.0,
                                                             target_modules="all-linear"), precision))
    model.set_activation_checkpointing("offload" if spec.checkpointing == "auto" else spec.checkpointing)
    cfg = Config(optim=OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, betas=list(BETAS), eps=EPS),
                 trainer=TrainerConfig(micro_batch_size=spec.micro_batch, seq_len=spec.seq, precision="bf16",
                                       activation_checkpointing=spec.checkpointing,
                                       memory_budget_gib=spec.memory_budget_gib))
    strategy = SingleDevice(cfg, device)
    model = strategy.setup(model, LR)
    model.train()
    if spec.checkpointing == "auto":  # the loop's own search (launcher/auto_batch.py), in a scratch directory
        with tempfile.TemporaryDirectory() as scratch:
            auto_batch.checkpointed_blocks_for_run(cfg, Path(scratch), model, strategy, contextlib.nullcontext, 1)
    ids, labels = _make_batch(config.vocab_size, spec.micro_batch, spec.seq, device)
    micro_batches = [{"input_ids": ids, "labels": labels}]
    pad_id = -1  # random ids contain no padding; every position counts as a token

    def step(batches=micro_batches):
        loss, _grad_norm, _tokens = train_step(model, strategy, batches, precision, pad_id,
                                               grad_clip=GRAD_CLIP)  # .item() inside: one host sync/step
        return loss

    return step, model, n_params, ops.name, model.checkpointed_blocks


def _smoke_interpreter_setup(kernels: str, device) -> None:
    """--smoke --smoke-kernels triton on CPU: Triton's interpreter with the tests' numpy fix."""
    if kernels != "triton" or device.type != "cpu":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    import importlib.util

    spec = importlib.util.spec_from_file_location("_slipstream_tests_conftest", REPO / "tests" / "conftest.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def run_one(args) -> None:
    """Child process: one (workload, system) row, printed as `RESULT {json}`."""
    import torch

    device = _device(args)
    workload, system = args.one
    spec = WORKLOADS[workload]
    mb, seq = spec.micro_batch, spec.seq
    kernels = args.smoke_kernels if device.type == "cpu" else "triton"
    t_setup = time.perf_counter()
    if system == "slipstream":
        _smoke_interpreter_setup(kernels, device)
        step, model, n_params, ops_name, checkpointed = build_slipstream(spec, device, kernels)
    else:
        step, model, n_params = build_hf(system, workload, device, args.smoke)
        ops_name, checkpointed = None, (MODELS[spec.model]["num_hidden_layers"] if spec.checkpointing == "full" else 0)
    recomputed = checkpointed / MODELS[spec.model]["num_hidden_layers"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        loss = step()
    _sync(device)
    setup_s = time.perf_counter() - t_setup

    if args.profile_steps:
        profile_child(args, step, workload, recomputed, device)
        return

    use_events = device.type == "cuda"
    marks = []
    if use_events:
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
    _sync(device)
    t0 = time.perf_counter()
    if use_events:
        marks[0].record()
    for i in range(args.steps):
        loss = step()
        if use_events:
            marks[i + 1].record()
    _sync(device)
    elapsed = time.perf_counter() - t0
    step_times = [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(args.steps)] if use_events else []

    tokens = mb * seq
    flops = flop_counts(spec.model, spec.mode, seq, recomputed)
    tps = tokens * args.steps / elapsed
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    peak = peak_bf16(name, args.peak_tflops)
    model_flops_s = flops["model_flops_per_token"] * tps
    ceiling = args.matmul_tflops * 1e12 if args.matmul_tflops else None
    row = {
        "run_id": args.run_id,
        "device": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "workload": workload,
        "system": system,
        "tokens_per_s": tps,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
        "mfu": model_flops_s / peak if peak else None,
        "mfu_vs_matmul_ceiling": model_flops_s / ceiling if ceiling else None,
        "model_tflops_per_s": model_flops_s / 1e12,
        "hw_tflops_per_s": flops["hw_flops_per_token"] * tps / 1e12,
        "device_peak_bf16_tflops": peak / 1e12 if peak else None,
        "matmul_tflops": args.matmul_tflops,
        "step_s": elapsed / args.steps,
        "step_s_median": sorted(step_times)[len(step_times) // 2] if step_times else None,
        "step_s_min": min(step_times) if step_times else None,
        "step_s_max": max(step_times) if step_times else None,
        "loss": float(loss),
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "setup_and_warmup_s": setup_s,
        "micro_batch": mb,
        "seq": seq,
        "activation_checkpointing": spec.checkpointing,
        "checkpointed_blocks": checkpointed,
        "memory_budget_gib": spec.memory_budget_gib or None,
        "mode": spec.mode,
        "params": n_params,
        "dense_params": flops["dense_params"],
        "model_flops_per_token": flops["model_flops_per_token"],
        "grad_clip": GRAD_CLIP,
        "optimizer": f"AdamW(fused={device.type == 'cuda'}, lr={LR}, wd={WEIGHT_DECAY}, betas={BETAS})",
        "kernels": ops_name,
        **_versions(),
    }
    print("RESULT " + json.dumps(row), flush=True)


def run_matmul(args) -> None:
    """Child process: the measured bf16 matmul ceiling (random data, median of timed products)."""
    import torch

    device = _device(args)
    n = 8192 if device.type == "cuda" else 256
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        torch.mm(a, b, out=c)
    _sync(device)
    times = []
    for _ in range(20):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            torch.mm(a, b, out=c)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - t0)
    assert torch.isfinite(c.float()).all()
    med = sorted(times)[len(times) // 2]
    res = {"n": n, "median_s": med, "tflops": 2 * n**3 / med / 1e12, "best_tflops": 2 * n**3 / min(times) / 1e12,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"}
    print("MATMUL " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- profile

_CATEGORIES = [
    ("gemm (cuBLAS/CUTLASS)", r"gemm|nvjet|cutlass|xmma|cublas|^sm\d+_|^aten::(mm|addmm|bmm)$"),
    ("attention (SDPA flash)", r"flash|fmha|attention|sdpa"),
    ("optimizer + clip (multi_tensor)", r"multi_tensor|adam|foreach|norm_kernel|lpnorm"),
    ("memcpy/memset", r"^Memcpy|^Memset"),
    ("elementwise/reduce (aten)", r"elementwise|reduce|vectorized|unrolled|index|scatter|gather|cat|copy|fill"),
]


def _triton_kernel_names() -> set[str]:
    try:
        import triton

        from kernels.ops import linear_cross_entropy, rms_norm, rope, swiglu  # noqa: F401
    except ImportError:
        return set()
    names = set()
    for mod_name in ("linear_cross_entropy", "rms_norm", "rope", "swiglu"):
        mod = sys.modules[f"kernels.ops.{mod_name}"]
        for key, value in vars(mod).items():
            if isinstance(value, triton.runtime.JITFunction):
                names.add(key)
    return names


def _category(name: str, ours: set[str]) -> str:
    if name in ours or any(name.startswith(n) for n in ours):
        return "Slipstream Triton kernels"
    for label, pattern in _CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def profile_child(args, step, workload: str, recomputed: float, device) -> None:
    """Time a few unprofiled steps, then profile `args.profile_steps` steps; kernel table to the out dir."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    n_timed = 5
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n_timed):
        step()
    _sync(device)
    step_s = (time.perf_counter() - t0) / n_timed
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        _sync(device)
    n = args.profile_steps

    agg: dict[str, list] = {}
    if device.type == "cuda":
        for e in prof.events():
            # kernels, memcpy and memset on the GPU; not the GPU-side spans of record_function annotations
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
                entry = agg.setdefault(e.name, [0, 0.0])
                entry[0] += 1
                entry[1] += e.time_range.elapsed_us() / 1e3
        unit = "CUDA kernels"
    else:  # smoke on CPU: top aten ops by self CPU time instead
        for e in prof.key_averages():
            agg[e.key] = [e.count, e.self_cpu_time_total / 1e3]
        unit = "CPU ops (smoke: no GPU)"
    ours = _triton_kernel_names()
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])
    busy_ms = sum(v[1] for _, v in rows) / n
    step_ms = step_s * 1e3
    spec = WORKLOADS[workload]
    tokens = spec.micro_batch * spec.seq
    flops = flop_counts(spec.model, spec.mode, spec.seq, recomputed)
    dense = flops["dense_params"]

    lines = [f"# profile: slipstream {workload}, {n} profiled steps after {args.warmup} warm-up, "
             f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (smoke)'}",
             f"# unprofiled step (mean of {n_timed}): {step_ms:.1f} ms; {unit} total per step: {busy_ms:.1f} ms "
             f"({100 * busy_ms / step_ms:.1f}% of the step; the rest is the GPU waiting on the host)",
             "", "## by category (per step)", f"{'category':34s} {'ms/step':>9s} {'% step':>7s}"]
    cats: dict[str, float] = {}
    for name, (_, ms) in rows:
        cats[_category(name, ours)] = cats.get(_category(name, ours), 0.0) + ms / n
    for label, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"{label:34s} {ms:9.2f} {100 * ms / step_ms:7.1f}")

    ceiling = args.matmul_tflops * 1e12 if args.matmul_tflops else None
    gemm_ms = cats.get("gemm (cuBLAS/CUTLASS)", 0.0)
    gemm_flops = (6 if spec.mode == "full" else 4) * dense * tokens + recomputed * 2 * dense * tokens
    model_flops = flops["model_flops_per_token"] * tokens
    lines += ["", "## gap to the matmul ceiling"]
    if ceiling:
        ideal_ms = model_flops / ceiling * 1e3
        lines.append(f"measured bf16 matmul ceiling (8192^3 on GPU): {args.matmul_tflops:.0f} TFLOP/s")
        lines.append(f"all model FLOPs ({model_flops / 1e12:.1f} TFLOP/step) at that rate: {ideal_ms:.1f} ms/step; "
                     f"measured {step_ms:.1f} ms -> {100 * ideal_ms / step_ms:.1f}% of the ceiling "
                     f"(gap {step_ms - ideal_ms:.1f} ms/step)")
        if gemm_ms > 0:
            lines.append(f"dense matmuls: {gemm_flops / 1e12:.1f} TFLOP/step in {gemm_ms:.1f} ms of gemm kernels -> "
                         f"{gemm_flops / gemm_ms / 1e9:.0f} TFLOP/s ({100 * gemm_flops / gemm_ms / 1e9 / args.matmul_tflops:.0f}% "
                         f"of the ceiling; ideal {gemm_flops / ceiling * 1e3:.1f} ms)")
        lines.append(f"non-gemm kernels: {busy_ms - gemm_ms:.1f} ms/step; host-side gaps: {step_ms - busy_ms:.1f} ms/step")
    else:
        lines.append("(no matmul ceiling measured in this run)")

    top = ["", f"## top {unit} by total time over {n} steps (% step = total / {n} / unprofiled step)",
           f"{'name':100s} {'calls':>6s} {'total ms':>9s} {'% step':>7s}"]
    for name, (calls, ms) in rows[:60]:
        short = name if len(name) <= 100 else name[:97] + "..."
        top.append(f"{short:100s} {calls:6d} {ms:9.2f} {100 * ms / n / step_ms:7.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{workload}.txt").write_text("\n".join(lines + top) + "\n")
    print("\n".join(lines + top[:3 + 25]), flush=True)  # the summary and the top 25
    print("PROFILE_DONE", flush=True)


# ----------------------------------------------------------------------------- parent


def _child(argv: list[str], timeout: float, log_path: Path, env=None) -> tuple[int, str, str]:
    cmd = [sys.executable, str(Path(__file__).resolve())] + argv
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")) + f"\nTIMEOUT after {timeout}s"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {' '.join(cmd)}\nrc={rc}\n--- stdout\n{out}\n--- stderr\n{err}")
    return rc, out, err


def _common_argv(args) -> list[str]:
    argv = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--run-id", args.run_id, "--out", args.out,
            "--smoke-kernels", args.smoke_kernels]
    if args.smoke:
        argv.append("--smoke")
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    if args.matmul_tflops:
        argv += ["--matmul-tflops", str(args.matmul_tflops)]
    return argv


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = ["| workload | system | tokens/s | x liger | peak alloc GiB | x liger | MFU | MFU vs matmul | "
             "step s (median) | loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((b for b in rows if b["workload"] == r["workload"] and b["system"] == "liger"), None)
        tps_ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        mem_ratio = (r["peak_alloc_gib"] / base["peak_alloc_gib"]
                     if base and r["peak_alloc_gib"] and base["peak_alloc_gib"] else None)
        lines.append(
            f"| {r['workload']} | {r['system']} | {r['tokens_per_s']:,.0f} | {_fmt(tps_ratio, '.2f')} | "
            f"{_fmt(r['peak_alloc_gib'], '.1f')} | {_fmt(mem_ratio, '.2f')} | {_fmt(r['mfu'], '.1%')} | "
            f"{_fmt(r['mfu_vs_matmul_ceiling'], '.1%')} | {_fmt(r['step_s_median'] or r['step_s'], '.3f')} | "
            f"{r['loss']:.3f} |")
    return "\n".join(lines)


def run_tests(out: Path, timeout: float) -> None:
    print("== tests/test_ops.py tests/test_model_kernels.py on this device", flush=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "pytest", "tests/test_ops.py", "tests/test_model_kernels.py", "-q", "-rfEs", "-p", "no:cacheprovider"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")) + f"\nTIMEOUT after {timeout}s"
        rc = 124
    (out / "test_ops_gpu.txt").write_text(f"$ {' '.join(cmd)}\nrc={rc} ({time.time() - t0:.0f}s)\n{text}")
    tail = [l for l in text.strip().splitlines() if l.strip()][-15:]
    print("\n".join(tail), f"\n(rc={rc}, {time.time() - t0:.0f}s; full output in test_ops_gpu.txt)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="1b-full,1b-full-ckpt",
                    help="comma list of " + ", ".join(WORKLOADS) + " (--smoke: tiny-full,tiny-full-ckpt)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of slipstream, liger, hf")
    ap.add_argument("--lora", action="store_true", help="also run 8b-lora (Slipstream, HF + peft, Liger)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (>= 10 for reported numbers)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tests", action="store_true", help="first run the kernel tests here -> test_ops_gpu.txt")
    ap.add_argument("--tests-timeout", type=float, default=200)
    ap.add_argument("--profile", action="store_true",
                    help="profile 3 Slipstream steps of --profile-workload -> profile_<workload>.txt")
    ap.add_argument("--profile-workload", default=None, help="default 1b-full (--smoke: tiny-full)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU in seconds (no GPU needed)")
    ap.add_argument("--smoke-kernels", default="torch", choices=("torch", "triton"),
                    help="Slipstream ops on CPU under --smoke (triton: Triton's interpreter, slow)")
    ap.add_argument("--no-matmul", action="store_true", help="skip the matmul-ceiling measurement")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak dense bf16 TFLOP/s")
    ap.add_argument("--budget-s", type=float, default=530,
                    help="wall-clock budget: rows that would not fit are skipped (JSON is written after every row)")
    ap.add_argument("--row-timeout", type=float, default=180, help="seconds before one row's subprocess is killed")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/bench_train_out")
    # internal (children)
    ap.add_argument("--one", nargs=2, metavar=("WORKLOAD", "SYSTEM"), help=argparse.SUPPRESS)
    ap.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-steps", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--matmul-tflops", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))

    if args.one:
        run_one(args)
        return
    if args.matmul:
        run_matmul(args)
        return

    started = time.time()
    args.run_id = args.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    if args.smoke:
        if args.workloads == ap.get_default("workloads"):
            args.workloads = "tiny-full,tiny-full-ckpt"
        if args.systems == ap.get_default("systems"):
            args.systems = "slipstream,hf"  # Liger's kernels need a GPU
        args.warmup = min(args.warmup, 1)
        args.steps = min(args.steps, 2)
        args.row_timeout = max(args.row_timeout, 600) if args.smoke_kernels == "triton" else args.row_timeout
    workloads = [w for w in args.workloads.split(",") if w]
    systems = [s for s in args.systems.split(",") if s]
    lora_workload = "tiny-lora" if args.smoke else "8b-lora"
    if args.lora and lora_workload not in workloads:
        workloads.append(lora_workload)
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    if args.steps < 10 and not args.smoke:
        print(f"warning: --steps {args.steps} < 10: not for reported numbers", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"run_id {args.run_id}; out {out}; workloads {workloads}; systems {systems}; "
          f"warmup {args.warmup}, steps {args.steps}", flush=True)
    left = lambda: args.budget_s - (time.time() - started)  # noqa: E731

    if args.tests:
        run_tests(out, min(args.tests_timeout, max(30.0, left() - 120)))

    if not args.no_matmul:
        rc, stdout, err = _child(["--matmul"] + _common_argv(args), 120, out / "logs" / "matmul.log")
        line = [l for l in stdout.splitlines() if l.startswith("MATMUL ")]
        if line:
            mm = json.loads(line[0][7:])
            args.matmul_tflops = mm["tflops"]
            (out / "matmul_ceiling.json").write_text(json.dumps(mm, indent=1))
            print(f"matmul ceiling: {mm['n']}^3 bf16 on {mm['device']}: {mm['tflops']:.0f} TFLOP/s median "
                  f"({mm['best_tflops']:.0f} best of 20)", flush=True)
        else:
            print(f"matmul ceiling FAILED rc={rc}\n{err[-2000:]}", flush=True)

    plan = [(w, s) for w in workloads for s in systems]
    profile_workload = args.profile_workload or ("tiny-full" if args.smoke else "1b-full")
    if args.profile:
        # after the 1b-full rows, before the checkpointed ones
        idx = max([i + 1 for i, (w, _) in enumerate(plan) if w == profile_workload] or [len(plan)])
        plan.insert(idx, (profile_workload, "profile"))
    rows: list[dict] = []
    min_row_s = 20 if args.smoke else 50  # don't start a row with less time than this left
    for workload, system in plan:
        if system not in ("slipstream", "profile") and WORKLOADS[workload].checkpointing in SLIPSTREAM_ONLY:
            print(f"note: {workload} / {system}: no such checkpointing mode there (no row)", flush=True)
            continue
        if WORKLOADS[workload].mode == "qlora" and system not in ("slipstream", "profile"):
            # HF's QLoRA loads a quantised checkpoint from disk: the peers' own script measures it
            print(f"note: {workload} / {system}: measured by anchors_qlora_unsloth.py (no row here)", flush=True)
            continue
        if left() < min_row_s:
            print(f"SKIPPED {workload}/{system}: {left():.0f}s of the budget left", flush=True)
            continue
        timeout = min(args.row_timeout, max(10.0, left()))
        t0 = time.time()
        if system == "profile":
            print(f"== profile slipstream {workload}", flush=True)
            rc, stdout, err = _child(["--one", workload, "slipstream", "--profile-steps", "3"] + _common_argv(args),
                                     timeout, out / "logs" / f"{workload}-profile.log")
            if "PROFILE_DONE" in stdout:
                print(stdout.split("PROFILE_DONE")[0].rstrip(), f"\n({time.time() - t0:.0f}s)", flush=True)
            else:
                print(f"FAILED profile rc={rc}\n{err[-3000:]}", flush=True)
            continue
        rc, stdout, err = _child(["--one", workload, system] + _common_argv(args), timeout,
                                 out / "logs" / f"{workload}-{system}.log")
        line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
        if line:
            row = json.loads(line[0][7:])
            rows.append(row)
            print(f"{workload:14s} {system:10s} {row['tokens_per_s']:10,.0f} tok/s  step {row['step_s']:.3f}s  "
                  f"peak {_fmt(row['peak_alloc_gib'], '.1f')} GiB  MFU {_fmt(row['mfu'], '.1%')}  "
                  f"loss {row['loss']:.3f}  ({time.time() - t0:.0f}s)", flush=True)
            (out / "bench_train.json").write_text(json.dumps(rows, indent=1))
        else:
            print(f"FAILED {workload}/{system} rc={rc} ({time.time() - t0:.0f}s)\n{err[-3000:]}", flush=True)

    (out / "bench_train.json").write_text(json.dumps(rows, indent=1))
    main_keys = ("run_id", "device", "date", "workload", "system", "tokens_per_s", "peak_alloc_gib", "mfu",
                 "mfu_vs_matmul_ceiling", "step_s", "loss", "torch", "triton", "transformers", "liger_kernel")
    short = [{k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in main_keys} for r in rows]
    print(f"\n{out / 'bench_train.json'} (main fields here; every field in the file):\n["
          + ",\n".join(json.dumps(r) for r in short) + "]")
    md = table(rows)
    (out / "bench_train.md").write_text(md + "\n")
    print(f"\nrun {args.run_id} on {rows[0]['device'] if rows else '?'}; matmul ceiling "
          f"{_fmt(args.matmul_tflops, '.0f')} TFLOP/s; total {time.time() - started:.0f}s")
    print(md, flush=True)


if __name__ == "__main__":
    main()
