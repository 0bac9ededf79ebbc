"""`trainer.dry_run=true` (or `launch --dry-run`): the plan of a run, printed without training.

The model is built on the meta device (shapes, no memory), so an 8B plan is instant
on a laptop. The memory estimate per device, in bytes, with P parameters (T trainable),
W ranks and the strategy's sharding (1 = replicated, W = sharded over the ranks; HSDP
shards over W / replicas; offloaded states count 0):

    weights     P x param bytes / shard_params    (qlora: the adapted layers' base weights 0.5 bytes)
    gradients   T x grad bytes / shard_grads      (fsdp, hsdp, zero2, zero3 shard them)
    optimizer   T x optimizer bytes / shard_optim (fsdp, hsdp, zero1-3 shard them)
    gathered    root x param bytes + 2 decoder blocks x compute bytes, when parameters are
                sharded (FSDP's / ZeRO-3's working set: the unit in use plus the one prefetched)
    cast weights  under torch autocast: the compute-dtype copy of each plain block linear's
                  weight that autocast keeps for backward (none where FSDP gathers in bf16)
    activations micro_batch x seq_len x L x (6h + 2 d_kv + m i) x compute bytes;
                with activation checkpointing L x h per token plus one block's full set;
                offload keeps 2 block inputs on the device (the one in use, the one
                prefetched) instead of L; auto is planned as offload (it searches on the GPU)

param bytes are 4 (fp32, bf16_autocast) or 2 (bf16); AdamW keeps two states in the
parameters' dtype; DeepSpeed in bf16 keeps bf16 weights and gradients and 12 bytes of
fp32 master weight + states per trainable parameter. The activation term counts what
each block saves for backward (norm inputs and outputs, q/k/v, attention output, the
MLP's gate and up: m = 2; an adapted or 4-bit down projection keeps its input, the
SwiGLU product, too: m = 3); under torch autocast the residual stream is fp32 (the two
norms' inputs and a checkpointed block's input take 4 bytes) and each plain q/k/v/gate/up
keeps its own cast of the norm output (3 more h a block). Logits are computed in chunks
and left out. tests/test_dry_run.py checks the activation and cast-weight terms against
the bytes autograd keeps, on CPU. Add the CUDA context and allocator slack (about 1-2
GiB). precision=auto is planned as bf16_autocast unless trainer.device=cpu.
"""
from __future__ import annotations

from omegaconf import OmegaConf
from torch import nn

from launcher.batching import BatchPlan, scaled_lr
from launcher.compose import effective_world_size
from launcher.config import Config
from launcher.flops import flops_per_token
from launcher.model_factory import build_meta_model

GIB = 2**30


def planned_precision(cfg: Config) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "fp32" if cfg.trainer.device == "cpu" else "bf16_autocast"


def shard_factors(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """(params, gradients, optimizer states): over how many ranks each is split."""
    name = cfg.strategy.name
    if name == "fsdp":
        return world_size, world_size, world_size
    if name == "hsdp":
        replicas = cfg.strategy.replicate_degree or cfg.cluster.nnodes
        group = max(1, world_size // replicas)
        return group, group, group
    stage = cfg.strategy.zero_stage if name.startswith("zero") else 0
    return (world_size if stage >= 3 else 1, world_size if stage >= 2 else 1, world_size if stage >= 1 else 1)


def memory_estimate(cfg: Config, model, world_size: int) -> dict[str, float]:
    """Bytes per device by kind (module docstring), in GiB."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    precision = planned_precision(cfg)
    deepspeed = cfg.strategy.name.startswith("zero")
    half = precision == "bf16" or (deepspeed and precision == "bf16_autocast")
    param_bytes = 2 if half else 4
    compute_bytes = 4 if precision == "fp32" else 2
    optim_bytes = 12 if deepspeed and half else 2 * param_bytes
    shard_params, shard_grads, shard_optim = shard_factors(cfg, world_size)
    # qlora: the adapted layers' base weights are 4-bit (0.5 bytes); embeddings, norms and LM head are not
    adapted = [m.weight for m in model.modules() if hasattr(m, "lora_A")]
    quantized = sum(w.numel() for w in adapted) if cfg.peft.method == "qlora" else 0
    weights = ((total - quantized) * param_bytes + quantized * 0.5) / shard_params
    if cfg.strategy.offload_params:
        weights = 0.0
    optimizer = 0.0 if cfg.strategy.offload_optimizer else trainable * optim_bytes / shard_optim

    c = model.config
    blocks = model.model.layers
    block_params = sum(p.numel() for p in blocks[0].parameters())
    root_params = total - block_params * len(blocks)
    # the root is gathered in the parameters' dtype (strategies/fsdp.py), the blocks in the compute dtype
    gathered = root_params * param_bytes + 2 * block_params * compute_bytes if shard_params > 1 else 0.0
    # torch autocast (DeepSpeed runs its own bf16/fp16 modes instead) keeps each plain linear's cast weight
    # for backward, unless FSDP gathered the weight in bf16 already
    autocast = precision.endswith("_autocast") and not deepspeed
    gathered_in_bf16 = cfg.strategy.name in ("fsdp", "hsdp") and precision == "bf16_autocast"
    cast_weights = 0.0
    if autocast and not gathered_in_bf16:
        cast_weights = len(blocks) * sum(m.weight.numel() for m in _plain_linears(cfg, blocks[0])) * compute_bytes
    parts = {
        "weights": weights,
        "gradients": trainable * param_bytes / shard_grads,
        "optimizer": optimizer,
        "gathered": gathered,
        "cast weights": cast_weights,
        "activations": activation_bytes(cfg, model, compute_bytes, autocast),
    }
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def _plain_linears(cfg: Config, block) -> list[nn.Linear]:
    """A block's q/k/v/o/gate/up projections that run as nn.Linear: not adapted (the LoRA op) and not
    4-bit (QLoRA quantises every block linear; the meta model is not quantised). The down projection
    never does: dense, it is part of ops.swiglu_linear."""
    if cfg.peft.method == "qlora":
        return []
    attn, mlp = block.self_attn, block.mlp
    return [m for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj)
            if type(m) is nn.Linear]


def activation_bytes(cfg: Config, model, compute_bytes: int, autocast: bool) -> float:
    """What the blocks keep for backward (module docstring), in bytes."""
    c, blocks = model.config, model.model.layers
    tokens = planned_micro_batch(cfg) * cfg.trainer.seq_len
    # The MLP keeps gate and up (ops.swiglu_linear); an adapted or 4-bit down projection also keeps its input.
    dense_down = type(blocks[0].mlp.down_proj) is nn.Linear and cfg.peft.method != "qlora"
    per_block = (6 * c.hidden_size + 2 * c.num_key_value_heads * c.head_dim
                 + (2 if dense_down else 3) * c.intermediate_size) * compute_bytes
    residual_bytes = compute_bytes
    if autocast:
        # The residual stream stays fp32: the two norms keep fp32 inputs, a checkpointed block an fp32 input;
        # and each plain q/k/v/gate/up keeps its own cast of the fp32 norm output (5, where 2 are counted;
        # o_proj reads the attention output, already in the compute dtype).
        residual_bytes = 4
        per_block += 2 * c.hidden_size * (4 - compute_bytes)
        casts = [m for m in _plain_linears(cfg, blocks[0]) if m is not blocks[0].self_attn.o_proj]
        per_block += max(len(casts) - 2, 0) * c.hidden_size * compute_bytes
    checkpointing = cfg.trainer.activation_checkpointing
    if checkpointing == "full":
        return tokens * (c.num_hidden_layers * c.hidden_size * residual_bytes + per_block)
    if checkpointing in ("offload", "auto"):
        return tokens * (2 * c.hidden_size * residual_bytes + per_block)
    return tokens * c.num_hidden_layers * per_block


def planned_micro_batch(cfg: Config) -> int:
    """micro_batch_size=auto is found on the device at start (launcher/auto_batch.py); the plan shows 1."""
    return 1 if cfg.trainer.micro_batch_size == "auto" else cfg.trainer.micro_batch_size


def dry_run(cfg: Config, show: bool = True) -> dict:
    """Prints (if `show`: rank 0) the resolved config, topology, batch, parameters and memory; returns the plan."""
    world_size = effective_world_size(cfg)
    plan = BatchPlan.resolve(cfg.trainer.global_batch_size, planned_micro_batch(cfg), world_size)
    model = build_meta_model(cfg)
    params = list(model.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    memory = memory_estimate(cfg, model, world_size)
    result = {
        "world_size": world_size, "micro_batch_size": plan.micro_batch_size,
        "accumulation_steps": plan.accumulation_steps, "global_batch_size": plan.global_batch_size,
        "params": total, "trainable_params": trainable,
        "flops_per_token": flops_per_token(model, cfg.trainer.seq_len), "memory_gib": memory,
    }
    if not show:
        return result
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
    lr = scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling, plan.global_batch_size, cfg.optim.reference_batch_size)
    step_tokens = plan.global_batch_size * cfg.trainer.seq_len
    rows = [
        ("topology", f"{cfg.cluster.nnodes} node(s) x {world_size // cfg.cluster.nnodes} process(es) = world size "
                     f"{world_size}, strategy {cfg.strategy.name}"),
        ("precision", f"{cfg.trainer.precision} (planned as {planned_precision(cfg)}), activation checkpointing "
                      f"{cfg.trainer.activation_checkpointing}"),
        ("batch", f"global {plan.global_batch_size} = micro {plan.micro_batch_size}"
                  f"{' (auto: searched on the GPU at start; planned here as 1)' if cfg.trainer.micro_batch_size == 'auto' else ''}"
                  f" x accumulation "
                  f"{plan.accumulation_steps} x world {world_size}; "
                  f"<= {step_tokens:,} tokens per step (seq_len {cfg.trainer.seq_len}); lr {lr:.3g}"),
        ("parameters", f"{total:,} total, {trainable:,} trainable ({cfg.peft.method})"),
        ("FLOPs/token", f"{result['flops_per_token']:.3g} (training, launcher/flops.py)"),
        ("memory/device", ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k != "total")
         + f" -> about {memory['total']:.2f} GiB (+ CUDA context)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("dry run (nothing trained):\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)
    return result
