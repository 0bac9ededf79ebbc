"""Compose and validate a config once, turning every Hydra/OmegaConf failure into one line.

Validation runs before Hydra creates a run directory, so bad input leaves nothing
behind: every job of a sweep is composed and checked first.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from launcher.config import Config, register_schemas
from launcher.data import is_hub_name

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A user error in the config: one line naming the key and the fix."""


def compose_config(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="launch"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None
    except AssertionError:  # OmegaConf asserts when an override descends into a None node
        raise ConfigError(f"cannot apply overrides {' '.join(overrides)}: a key descends into a value that "
                          f"is not set (null); set the whole value instead, e.g. key={{a: 1}}") from None
    finally:
        GlobalHydra.instance().clear()


def to_config(cfg: DictConfig) -> Config:
    """The typed config; runs every schema's value checks and the cross-group checks."""
    job = {k: v for k, v in cfg.items() if k != "hydra"}
    _reject_unknown_keys(OmegaConf.create(job), Config, "")
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), job))
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key}: required but not set; pass {err.full_key}=<value>") from None
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(_one_line(err)) from None
    _check_paths(config)
    _check_strategy(config)
    return config


def effective_world_size(config: Config) -> int:
    """Under torchrun/srun the environment says; otherwise the cluster config (what `launch` will start)."""
    return int(os.environ.get("WORLD_SIZE", config.world_size))


def _check_strategy(config: Config) -> None:
    """Strategy x cluster x batch: what no single schema can see."""
    from launcher.batching import BatchPlan

    world = effective_world_size(config)
    strategy = config.strategy
    if strategy.name == "single" and world > 1:
        raise ConfigError(f"strategy=single: runs one process, but the world size is {world} (cluster.nproc_per_node="
                          f"{config.cluster.nproc_per_node}, cluster.nnodes={config.cluster.nnodes}); use "
                          f"strategy=ddp, fsdp, hsdp, zero1, zero2 or zero3")
    if strategy.name == "hsdp":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", config.cluster.nproc_per_node))
        replicas = strategy.replicate_degree or max(1, world // per_node)
        if world % replicas:
            raise ConfigError(f"strategy.replicate_degree={strategy.replicate_degree}: {replicas} model copies do not "
                              f"divide the world size {world}; pick a divisor of {world}")
    global_batch, micro = config.trainer.global_batch_size, config.trainer.micro_batch_size
    if micro == "auto":
        if strategy.name.startswith("zero"):
            raise ConfigError(f"trainer.micro_batch_size=auto: DeepSpeed fixes the micro batch in its config before "
                              f"the first step; set a number with strategy={strategy.name}, or use single, ddp or fsdp")
        if global_batch % world:
            raise ConfigError(f"trainer.global_batch_size={global_batch}: not divisible by the world size {world}, so "
                              f"micro_batch_size=auto has no whole share per rank; use a multiple of {world}")
        micro = 1  # the search keeps accumulation whole; this checks the rest of the plan
    if config.trainer.activation_checkpointing == "auto" and strategy.name.startswith("zero"):
        raise ConfigError(f"trainer.activation_checkpointing=auto: its trial backward passes would stay in "
                          f"DeepSpeed's gradient buffers; use full or offload with strategy={strategy.name}, or "
                          f"single, ddp or fsdp")
    try:
        plan = BatchPlan.resolve(global_batch, micro, world)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if strategy.name.startswith("zero") and config.optim.name != "adamw":
        raise ConfigError(f"optim={config.optim.name}: DeepSpeed ZeRO partitions and steps its own AdamW; use "
                          f"optim=adamw with strategy={strategy.name} (offload: strategy=zero3_offload), or "
                          f"{config.optim.name} with strategy=single or ddp")
    if strategy.name in ("fsdp", "hsdp") and config.optim.name != "adamw":
        raise ConfigError(f"optim={config.optim.name}: bitsandbytes' optimizer kernels take plain tensors, and "
                          f"strategy={strategy.name} shards parameters as DTensors; use optim=adamw with "
                          f"strategy={strategy.name}, or {config.optim.name} with strategy=single or ddp")
    if strategy.name.startswith("zero") and strategy.deepspeed_config:
        from strategies.zero import deepspeed_config

        try:
            deepspeed_config(config, plan, config.optim.lr, half=None, device_type="cpu")
        except ValueError as err:
            raise ConfigError(str(err)) from None


def check_machine(config: Config, launching: bool) -> None:
    """What this machine can run: GPUs for the ranks, DeepSpeed installed, offload only from a GPU.

    `launching`: `launch` is about to start cluster.nproc_per_node processes here;
    otherwise this is a worker that torchrun/srun started.
    """
    import torch

    trainer, strategy = config.trainer, config.strategy
    cuda = torch.cuda.is_available()
    if trainer.device == "cuda" and not cuda:
        raise ConfigError("trainer.device=cuda: no CUDA device is visible; use trainer.device=cpu or auto")
    on_gpu = cuda and trainer.device != "cpu"
    per_node = config.cluster.nproc_per_node if launching else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if on_gpu and per_node > torch.cuda.device_count():
        key = "cluster.nproc_per_node" if launching else "torchrun --nproc_per_node"
        raise ConfigError(f"{key}={per_node}: only {torch.cuda.device_count()} GPU(s) visible on this node "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use at most "
                          f"{torch.cuda.device_count()} processes per node, or trainer.device=cpu")
    if strategy.name.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"strategy={strategy.name}: DeepSpeed is not installed; pip install 'slipstream[deepspeed]' "
                          f"(or deepspeed), or use strategy=fsdp")
    if trainer.micro_batch_size == "auto" and not on_gpu:
        raise ConfigError("trainer.micro_batch_size=auto: searches the largest micro batch that fits a GPU, and this "
                          f"run is on the CPU (trainer.device={trainer.device}); set trainer.micro_batch_size to a number")
    if trainer.activation_checkpointing == "auto" and not on_gpu:
        raise ConfigError("trainer.activation_checkpointing=auto: fits the checkpointed blocks to a GPU's memory, and "
                          f"this run is on the CPU (trainer.device={trainer.device}); use none, full or offload")
    if config.optim.name != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"optim={config.optim.name}: needs bitsandbytes; pip install 'slipstream[qlora]' "
                          f"(or bitsandbytes), or use optim=adamw")
    if strategy.name.startswith("zero") and trainer.precision == "fp16_autocast" and not on_gpu:
        raise ConfigError(f"trainer.precision=fp16_autocast: DeepSpeed's CPU backend has no fp16 mode; run "
                          f"strategy={strategy.name} on a GPU, or use trainer.precision=fp32 (or strategy=ddp/fsdp)")
    for key in ("offload_optimizer", "offload_params"):
        if getattr(strategy, key) and not on_gpu:
            raise ConfigError(f"strategy.{key}=true: offloading moves GPU memory to the CPU, and this run is on the CPU "
                              f"(trainer.device={trainer.device}); use strategy=zero3, or run on a GPU")


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Hydra's `+key=value` adds keys even to typed nodes; the schema is the contract."""
    fields = {f.name: f.type for f in dataclasses.fields(schema)}
    for key in node.keys():
        full_key = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{full_key}: no such key{_valid_keys(prefix.rstrip('.'))}")
        nested = getattr(schema, "__dataclass_fields__")[key].default_factory
        if dataclasses.is_dataclass(nested) and isinstance(node[key], DictConfig):
            _reject_unknown_keys(node[key], nested, f"{full_key}.")


def _check_paths(config: Config) -> None:
    for key, value in (("model.path", config.model.path), ("model.tokenizer", config.model.tokenizer),
                       ("data.path", config.data.path), ("data.eval_path", config.data.eval_path),
                       ("strategy.deepspeed_config", config.strategy.deepspeed_config)):
        if value and not Path(value).exists() and not (key.startswith("data.") and is_hub_name(value)):
            raise ConfigError(f"{key}={value}: no such file or directory")
    if config.model.path and not (Path(config.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path={config.model.path}: no config.json there; point it at a Hugging Face "
                          f"model directory")


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides of a `-m` sweep (the cartesian product, as Hydra's basic sweeper)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(_one_line(err)) from None
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([f"{key}={override.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*choices)]


def validate(overrides: list[str], multirun: bool) -> list[Config]:
    """Every job's typed config, checked against this machine as `launch` will run it."""
    jobs = expand_sweep(overrides) if multirun else [overrides]
    configs = [to_config(compose_config(job)) for job in jobs]
    for config in configs:
        check_machine(config, launching=True)
    return configs


def _one_line(err: Exception) -> str:
    """The first useful line of an OmegaConf/Hydra error, with the key and a fix."""
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        parent = cause.full_key.rsplit(".", 1)[0] if "." in cause.full_key else ""
        return f"{cause.full_key}: no such key{_valid_keys(parent)}"
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        message = str(cause.msg).splitlines()[0]
        return f"{cause.full_key}: {message}"
    if isinstance(err, MissingConfigException):
        # "In 'config': Could not find 'model/nope'" + the options, then the search path
        text = str(err).split("Config search path:")[0]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        options = [line for line in lines[1:] if not line.startswith("Available")]
        missing = lines[0].split("Could not find ")[-1].strip("'")
        group, _, option = missing.partition("/")
        return f"{group}={option}: no such option" + (f"; available: {', '.join(options)}" if options else "")
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _valid_keys(parent: str) -> str:
    node = OmegaConf.structured(Config)
    for part in filter(None, parent.split(".")):
        node = node.get(part) if isinstance(node, DictConfig) else None
    if isinstance(node, DictConfig):
        return f"; valid keys{' of ' + parent if parent else ''}: {', '.join(node.keys())}"
    return ""
