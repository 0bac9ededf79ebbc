"""Compose and validate a config once, turning every Hydra/OmegaConf failure into one line.

Validation runs before Hydra creates a run directory, so bad input leaves nothing
behind: every job of a sweep is composed and checked first.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from launcher.config import Config, register_schemas

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
    return config


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
                       ("data.path", config.data.path), ("data.eval_path", config.data.eval_path)):
        if value and not Path(value).exists():
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
    jobs = expand_sweep(overrides) if multirun else [overrides]
    return [to_config(compose_config(job)) for job in jobs]


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
