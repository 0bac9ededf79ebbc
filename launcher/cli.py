"""`launch`: compose and validate once, then run the job under Hydra (one process) or exit with one line.

With several processes (cluster.nproc_per_node x cluster.nnodes > 1) or
cluster.max_restarts > 0 the job runs under torchrun, started here on the resolved
config in the run directory; launch exits with torchrun's exit code.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launcher.compose import CONF_DIR, ConfigError, to_config, validate
from launcher.config import register_schemas
from launcher.spawn import default_allocator_config, needs_torchrun

# Flags after which Hydra only prints something: nothing to validate.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--shell-completion", "-sc"}
_MULTIRUN_FLAGS = {"-m", "--multirun"}
# Read once, before any job: a one-process job of a sweep sets RANK/WORLD_SIZE in this
# process for its group of one, which must not make the next job think it is a worker.
_STARTED_AS_WORKER = "WORLD_SIZE" in os.environ


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """The resolved job config, which workers read instead of composing again."""
    job = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
    path = run_dir / "config.yaml"
    # Written whole, then renamed: on several nodes each `launch` writes the same file
    # into the shared run directory while the other node's workers may be reading it.
    partial = path.with_name(f".config.yaml.{platform.node()}.{os.getpid()}")
    partial.write_text(OmegaConf.to_yaml(job, resolve=True))
    os.replace(partial, path)
    return path


register_schemas()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _run(cfg: DictConfig) -> dict:
    from launcher.loop import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = to_config(cfg)
        resolved = write_resolved_config(cfg, run_dir)
        if needs_torchrun(config.cluster) and not _STARTED_AS_WORKER and not config.trainer.dry_run:
            return _spawn(config, resolved)
        return train(config, run_dir)
    except ValueError as err:  # user errors found only while setting up (data files, checkpoints)
        print(f"launch: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _spawn(config, resolved: Path) -> dict:
    """torchrun with cluster.nproc_per_node workers (on this node) on the resolved config; its exit code is ours.

    Except after a preemption: torchrun exits non-zero when it passes a signal on, even
    though the workers saved a checkpoint and ended cleanly; then, as in one process, 0.
    """
    from launcher.spawn import run_torchrun

    started = time.time()
    code = run_torchrun(resolved, config.cluster)
    summary_file = resolved.parent / "summary.json"
    fresh = summary_file.is_file() and summary_file.stat().st_mtime >= started  # not a previous attempt's
    summary = json.loads(summary_file.read_text()) if fresh else {}
    if code != 0 and not summary.get("preempted"):
        print(f"launch: error: torchrun exited with code {code} (run dir {resolved.parent})", file=sys.stderr)
        raise SystemExit(code)
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:  # reads finished or running run directories; composes nothing
        from launcher.report import main as report

        return report(argv[1:])
    if argv[:1] == ["export"]:  # a checkpoint -> a Hugging Face directory; composes nothing
        from launcher.export import main as export

        return export(argv[1:])
    argv = ["trainer.dry_run=true" if arg == "--dry-run" else arg for arg in argv]
    if not _INFO_FLAGS.intersection(argv):
        overrides = [a for a in argv if not a.startswith("-")]
        try:
            validate(overrides, multirun=bool(_MULTIRUN_FLAGS.intersection(argv)))
        except ConfigError as err:
            print(f"launch: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    sys.argv = [sys.argv[0], *argv]
    default_allocator_config(os.environ)  # before anything touches CUDA; torchrun's workers inherit it
    _run()


if __name__ == "__main__":
    main()
