"""Typed schemas for every config group, registered in Hydra's ConfigStore.

OmegaConf checks keys and types when the YAML files and the overrides are merged
into these dataclasses; `__post_init__` checks values when the composed config is
turned into objects (`to_object`). Every failure names the key and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

PRECISIONS = ("auto", "fp32", "bf16_autocast", "bf16", "fp16_autocast")
SCHEDULES = ("cosine", "linear", "constant")
LR_SCALING_RULES = ("none", "linear", "sqrt")
DATA_FORMATS = ("text", "prompt_completion", "chat", "alpaca")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")  # the last three: bitsandbytes
STRATEGIES = ("single", "ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3", "zero3_offload")
PEFT_METHODS = ("none", "lora", "qlora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINTING = ("none", "full", "offload", "auto")
OVERLONG = ("truncate", "drop")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    _require(value in choices, key, f"got {value!r}; choose one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """The architecture for random init; with `path` it comes from the directory's config.json."""

    name: str = "tiny"
    path: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to `path`, or the bundled tokenizer
    kernels: str = "auto"
    model_type: str = "llama"
    vocab_size: int = 0  # 0: the tokenizer's size
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        _one_of(self.kernels, ("auto", "triton", "torch"), "model.kernels")
        _one_of(self.model_type, MODEL_TYPES, "model.model_type")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads"):
            _require(getattr(self, key) > 0, f"model.{key}", "must be > 0")
        _require(self.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = the tokenizer's size)")


@dataclass
class PeftConfig:
    """Adapters instead of full fine-tuning; keys and defaults are peft's LoraConfig and
    transformers' BitsAndBytesConfig (the bnb_4bit_* keys, used by method=qlora only)."""

    method: str = "none"  # none | lora | qlora (LoRA over a frozen 4-bit base)
    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: Any = "all-linear"  # all-linear, or a list of LORA_TARGETS (q_proj, ..., down_proj)
    use_rslora: bool = False  # scaling lora_alpha / sqrt(r) instead of lora_alpha / r
    init_lora_weights: str = "true"  # true: A kaiming-uniform, B = 0 | gaussian: A ~ N(0, 1/r), B = 0
    bnb_4bit_quant_type: str = "nf4"  # nf4 | fp4
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    # the dtype the packed bytes are viewed as; auto: the one sharded parameters are gathered in
    # (launcher.precision.Precision.shard_dtype), so FSDP2 shards them and checkpoints move between strategies
    bnb_4bit_quant_storage: str = "auto"

    def __post_init__(self) -> None:
        _one_of(self.method, PEFT_METHODS, "peft.method")
        _require(self.r > 0, "peft.r", "must be > 0 (the adapter rank)")
        _require(self.lora_alpha > 0, "peft.lora_alpha", "must be > 0")
        _require(0.0 <= self.lora_dropout < 1.0, "peft.lora_dropout", "must be in [0, 1)")
        self.init_lora_weights = str(self.init_lora_weights).lower()  # YAML's `true` arrives as "True"
        _one_of(self.init_lora_weights, ("true", "gaussian"), "peft.init_lora_weights")
        if self.target_modules == "all-linear":
            self.target_modules = list(LORA_TARGETS)
        targets = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        _require(bool(targets) and not unknown, "peft.target_modules",
                 f"got {unknown or targets}; use all-linear or a list of {', '.join(LORA_TARGETS)}")
        self.target_modules = targets
        _one_of(self.bnb_4bit_quant_type, ("nf4", "fp4"), "peft.bnb_4bit_quant_type")
        _one_of(self.bnb_4bit_compute_dtype, ("float32", "bfloat16", "float16"), "peft.bnb_4bit_compute_dtype")
        _one_of(self.bnb_4bit_quant_storage, ("auto", "uint8", "float32", "bfloat16", "float16"),
                "peft.bnb_4bit_quant_storage")


@dataclass
class DataConfig:
    """Where the examples come from and how they become token sequences."""

    name: str = "demo"
    format: str = "prompt_completion"
    path: Optional[str] = None  # a file, a directory, a saved dataset or a hub name; None: the bundled demo data
    eval_path: Optional[str] = None
    split: str = "train"  # the split of a hub dataset or a saved DatasetDict
    eval_split: Optional[str] = None  # evaluate on this split of `path` (or of eval_path)
    eval_fraction: float = 0.0  # held out from `path` when there is no eval_path / eval_split
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    train_on_prompt: bool = False
    overlong: str = "truncate"  # examples longer than trainer.seq_len: truncate | drop (counted in the log)
    packing: bool = False  # several examples per sequence, attention and positions kept per example
    cache: bool = True  # keep the tokenised data on disk, keyed by data, tokenizer and format
    cache_dir: Optional[str] = None  # default: $SLIPSTREAM_CACHE/data or ~/.cache/slipstream/data
    max_eval_examples: int = 512
    eval_exact_match: bool = False  # greedy-decode the eval completions and count exact matches

    def __post_init__(self) -> None:
        _one_of(self.format, DATA_FORMATS, "data.format")
        _one_of(self.overlong, OVERLONG, "data.overlong")
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
        _require(self.max_eval_examples >= 0, "data.max_eval_examples", "must be >= 0")
        _require(bool(self.split), "data.split", "must name a split, e.g. train")
        _require(self.path is not None or self.name == "demo", "data.path",
                 f"required for data={self.name}; pass data.path=<file or directory>")


@dataclass
class StrategyConfig:
    """How the model is spread over ranks; each conf/strategy/*.yaml sets the keys it uses."""

    name: str = "single"
    # fsdp/hsdp: false keeps gathered parameters from forward to backward (shard-grad-op, ZeRO-2 style)
    reshard_after_forward: bool = True
    # hsdp: number of replica groups (world size / replicate_degree ranks shard each copy); 0 = one per node
    replicate_degree: int = 0
    # zero*: DeepSpeed ZeRO stage (1 optimizer states, 2 + gradients, 3 + parameters)
    zero_stage: int = 0
    offload_optimizer: bool = False  # zero*: optimizer states and step on the CPU
    offload_params: bool = False  # zero3: parameters on the CPU between uses
    deepspeed_config: Optional[str] = None  # zero*: a DeepSpeed JSON merged over the generated one

    def __post_init__(self) -> None:
        _one_of(self.name, STRATEGIES, "strategy.name")
        zero = self.name.startswith("zero")
        fsdp = self.name in ("fsdp", "hsdp")
        _require(fsdp or self.reshard_after_forward, "strategy.reshard_after_forward",
                 f"only fsdp/hsdp use it, not strategy={self.name}; remove the override (zero2 is "
                 f"DeepSpeed's shard-grad-op)")
        _require(self.replicate_degree >= 0, "strategy.replicate_degree", "must be >= 0 (0 = one replica per node)")
        _require(self.name == "hsdp" or self.replicate_degree == 0, "strategy.replicate_degree",
                 f"only hsdp uses it, not strategy={self.name}; use strategy=hsdp or remove the override")
        if zero:
            _require(self.zero_stage in (1, 2, 3), "strategy.zero_stage",
                     f"got {self.zero_stage}; choose 1, 2 or 3 (or strategy=zero1|zero2|zero3)")
        else:
            for key in ("zero_stage", "offload_optimizer", "offload_params", "deepspeed_config"):
                _require(not getattr(self, key), f"strategy.{key}",
                         f"only the DeepSpeed strategies (zero1, zero2, zero3, zero3_offload) use it, "
                         f"not strategy={self.name}")
        _require(not self.offload_params or self.zero_stage == 3, "strategy.offload_params",
                 f"needs ZeRO stage 3 (parameters are partitioned only there), got strategy.zero_stage="
                 f"{self.zero_stage}; use strategy=zero3_offload or set strategy.offload_params=false")


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    lr_scaling: str = "none"  # scale lr with the global batch against reference_batch_size
    reference_batch_size: int = 0

    def __post_init__(self) -> None:
        _one_of(self.name, OPTIMIZERS, "optim.name")
        _one_of(self.schedule, SCHEDULES, "optim.schedule")
        _one_of(self.lr_scaling, LR_SCALING_RULES, "optim.lr_scaling")
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                 "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        _require(self.lr_scaling == "none" or self.reference_batch_size > 0, "optim.reference_batch_size",
                 f"must be > 0 when optim.lr_scaling={self.lr_scaling}")


@dataclass
class TrainerConfig:
    global_batch_size: int = 64  # sequences per optimizer step, over all ranks
    micro_batch_size: Any = 8  # sequences per forward/backward on one device, or auto (launcher/auto_batch.py)
    memory_budget_gib: float = 0.0  # the auto sizes' peak allowed per device (0: 90% of the card)
    seq_len: int = 2048
    max_steps: int = 100
    precision: str = "auto"  # auto: bf16_autocast on GPUs with bf16, fp16_autocast on older GPUs, fp32 on CPU
    grad_clip: float = 1.0  # 0 disables clipping
    # none | full (recompute every block) | offload (full, block inputs in pinned host memory)
    # | auto (the fewest offloaded checkpointed blocks that fit memory_budget_gib): launcher/auto_batch.py
    activation_checkpointing: str = "none"
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 42
    deterministic: bool = False
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate once, at the end
    save_every: int = 0  # 0: save once, at the end
    keep_last: int = 2
    # resume: checksum every file of the chosen checkpoint (false: marker, manifest, sizes and
    # identity only; hashing reads every byte, minutes for a large optimizer state)
    verify_checkpoints: bool = True
    async_checkpoint: bool = False  # DCP strategies: write shards in the background (dcp.async_save), commit later
    resume: str = "auto"  # auto | never | PATH of a checkpoint
    export_hf: bool = True  # write a Hugging Face directory at the end
    max_nonfinite_steps: int = 5  # stop after this many skipped (NaN/inf loss or grad norm) steps in a row
    dry_run: bool = False  # print the plan (batch, parameters, memory per device) and exit without training

    def __post_init__(self) -> None:
        for key in ("global_batch_size", "seq_len", "max_steps", "log_every", "keep_last"):
            _require(getattr(self, key) > 0, f"trainer.{key}", "must be > 0")
        micro = self.micro_batch_size
        _require(micro == "auto" or (isinstance(micro, int) and not isinstance(micro, bool) and micro > 0),
                 "trainer.micro_batch_size", f"got {micro!r}; a number > 0, or auto (the largest that fits the GPU)")
        _require(self.memory_budget_gib >= 0, "trainer.memory_budget_gib", "must be >= 0 (0: 90% of the card)")
        _require(self.eval_every >= 0, "trainer.eval_every", "must be >= 0 (0 = at the end only)")
        _require(self.save_every >= 0, "trainer.save_every", "must be >= 0 (0 = at the end only)")
        _require(self.grad_clip >= 0, "trainer.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.max_nonfinite_steps > 0, "trainer.max_nonfinite_steps",
                 "must be > 0 (steps in a row with a NaN/inf loss or gradient norm before the run stops)")
        _one_of(self.precision, PRECISIONS, "trainer.precision")
        _one_of(self.activation_checkpointing, CHECKPOINTING, "trainer.activation_checkpointing")
        _one_of(self.device, ("auto", "cpu", "cuda"), "trainer.device")
        _require(micro == "auto" or self.global_batch_size % micro == 0, "trainer.global_batch_size",
                 f"{self.global_batch_size} is not a multiple of trainer.micro_batch_size={micro}")


@dataclass
class ClusterConfig:
    """What `launch` hands torchrun: processes per node, nodes, rendezvous and restarts."""

    name: str = "local"
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0  # only the static rendezvous uses it; c10d assigns ranks itself
    rdzv_backend: str = "c10d"
    rdzv_endpoint: Optional[str] = None  # host:port on the first node; required when nnodes > 1
    rdzv_id: str = "slipstream"  # the same on every node of one job, different between jobs
    max_restarts: int = 0  # torchrun restarts the whole group this often; workers resume from the newest checkpoint

    def __post_init__(self) -> None:
        _require(self.nproc_per_node >= 1, "cluster.nproc_per_node", "must be >= 1 (processes per node)")
        _require(self.nnodes >= 1, "cluster.nnodes", "must be >= 1")
        _require(0 <= self.node_rank < self.nnodes, "cluster.node_rank",
                 f"got {self.node_rank}; must be in [0, cluster.nnodes={self.nnodes})")
        _one_of(self.rdzv_backend, ("c10d", "static"), "cluster.rdzv_backend")
        _require(self.nnodes == 1 or bool(self.rdzv_endpoint), "cluster.rdzv_endpoint",
                 f"required with cluster.nnodes={self.nnodes}: pass cluster.rdzv_endpoint=<first node>:<free port>, "
                 f"the same on every node")
        _require(not self.rdzv_endpoint or ":" in self.rdzv_endpoint, "cluster.rdzv_endpoint",
                 f"got {self.rdzv_endpoint!r}; use host:port, e.g. node001:29500")
        _require(self.max_restarts >= 0, "cluster.max_restarts", "must be >= 0")


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl (always written): see launcher/loggers.py."""

    name: str = "console"
    progress_bar: bool = True  # tqdm on rank 0
    wandb: bool = False
    tensorboard: bool = False  # needs `pip install tensorboard`
    project: str = "slipstream"  # wandb project
    entity: Optional[str] = None  # wandb entity (team); None: the account's default
    group: Optional[str] = None  # wandb group; None: the Hydra sweep's directory name in a sweep
    tags: List[str] = field(default_factory=list)
    mode: str = "auto"  # wandb: auto (online with WANDB_API_KEY and a network, else offline) | online | offline
    peak_tflops: float = 0.0  # the device's dense bf16 peak for MFU; 0: from the table in launcher/flops.py

    def __post_init__(self) -> None:
        _one_of(self.mode, ("auto", "online", "offline"), "logger.mode")
        _require(self.peak_tflops >= 0, "logger.peak_tflops", "must be >= 0 (0 = look the device up)")


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    @property
    def world_size(self) -> int:
        return self.cluster.nproc_per_node * self.cluster.nnodes


def register_schemas() -> None:
    ConfigStore.instance().store(name="schema", node=Config)
