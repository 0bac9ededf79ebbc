"""`launch`: compose and validate once, then run the job under Hydra (one process) or exit with one line.

With cluster.nproc_per_node > 1 the job runs under torchrun, started here on the
resolved config in the run directory; launch exits with torchrun's exit code.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launcher.compose import CONF_DIR, ConfigError, to_config, validate
from launcher.config import register_schemas

# Flags after which Hydra only prints something: nothing to validate.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--shell-completion", "-sc"}
_MULTIRUN_FLAGS = {"-m", "--multirun"}


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """The resolved job config, which workers read instead of composing again."""
    job = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
    path = run_dir / "config.yaml"
    path.write_text(OmegaConf.to_yaml(job, resolve=True))
    return path


register_schemas()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _run(cfg: DictConfig) -> dict:
    from launcher.loop import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = to_config(cfg)
        resolved = write_resolved_config(cfg, run_dir)
        if config.world_size > 1 and "WORLD_SIZE" not in os.environ:
            return _spawn(config, resolved)
        return train(config, run_dir)
    except ValueError as err:  # user errors found only while setting up (data files, checkpoints)
        print(f"launch: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _spawn(config, resolved: Path) -> dict:
    """torchrun with cluster.nproc_per_node workers on the resolved config; its exit code is ours."""
    from launcher.spawn import run_torchrun

    code = run_torchrun(resolved, config.cluster.nproc_per_node)
    if code != 0:
        print(f"launch: error: torchrun exited with code {code} (run dir {resolved.parent})", file=sys.stderr)
        raise SystemExit(code)
    summary = resolved.parent / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _INFO_FLAGS.intersection(argv):
        overrides = [a for a in argv if not a.startswith("-")]
        try:
            validate(overrides, multirun=bool(_MULTIRUN_FLAGS.intersection(argv)))
        except ConfigError as err:
            print(f"launch: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    sys.argv = [sys.argv[0], *argv]
    _run()


if __name__ == "__main__":
    main()
