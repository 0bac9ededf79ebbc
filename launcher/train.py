"""`python -m launcher.train`: the worker entry point, one process per device under torchrun, srun or `launch`.

    python -m launcher.train --resolved RUN_DIR/config.yaml    # what `launch` starts: the run dir is the file's
    torchrun --nproc_per_node 8 -m launcher.train strategy=zero3 ...    # composes here, like `launch` would

Without --resolved every rank composes the same overrides, but `${now:...}` in the run
directory resolves per rank; rank 0 picks the run directory, broadcasts it and writes
the resolved config there.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from launcher.compose import check_machine, compose_config, to_config
from launcher.spawn import default_allocator_config
from launcher.topology import Topology


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__.split("\n")[0])
    parser.add_argument("--resolved", type=Path, help="a resolved config.yaml written by `launch`")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value), when there is no --resolved")
    args = parser.parse_args(argv)
    if args.resolved and args.overrides:
        parser.error("--resolved takes no overrides: the resolved config is final")
    return args


def _agreed_run_dir(cfg: DictConfig, topology: Topology, device_choice: str) -> Path:
    """Rank 0's run directory, the same on every rank."""
    run_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
    if topology.world_size > 1:
        import torch.distributed as dist

        from strategies.distributed import init_process_group

        init_process_group(topology.device(device_choice))
        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    return Path(run_dir)


def load(args: argparse.Namespace, topology: Topology):
    """(typed config, run directory) from the resolved file, or composed from the overrides."""
    if args.resolved:
        if not args.resolved.is_file():
            raise ValueError(f"--resolved {args.resolved}: no such file")
        return to_config(OmegaConf.load(args.resolved)), args.resolved.resolve().parent
    from launcher.cli import write_resolved_config

    cfg = compose_config(args.overrides, with_hydra=True)
    config = to_config(cfg)
    run_dir = _agreed_run_dir(cfg, topology, config.trainer.device)
    if topology.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, run_dir)
    return config, run_dir


def main(argv: list[str] | None = None) -> None:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    default_allocator_config(os.environ)
    topology = Topology.from_env()
    logging.basicConfig(level=logging.INFO if topology.rank == 0 else logging.WARNING,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        config, run_dir = load(args, topology)
        check_machine(config, launching=False)
        from launcher.loop import train

        train(config, run_dir, topology)
    except ValueError as err:  # user errors, one line per rank that found it; torchrun stops the others
        prefix = f"[rank {topology.rank}] " if topology.world_size > 1 else ""
        print(f"{prefix}launcher.train: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    from strategies.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main()
