"""One node, several processes: `launch` starts torchrun on the resolved config and waits for it.

The launcher composed and validated the config once and wrote it to the run
directory; every worker reads that file (`python -m launcher.train --resolved ...`),
so no rank composes Hydra defaults again or picks its own run directory.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def torchrun_command(resolved: Path, nproc_per_node: int) -> list[str]:
    # --standalone: a rendezvous on localhost with a free port (nothing hard-coded, nothing to clash).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "launcher.train", "--resolved", str(resolved)]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # Workers import this checkout even when it is not installed (python -m launcher from a clone).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # Restarts on gloo fail often without it (pytorch #135712, FIELD_NOTES).
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return env


def run_torchrun(resolved: Path, nproc_per_node: int) -> int:
    """Runs torchrun to completion; returns its exit code. SIGTERM/SIGHUP are passed on to it."""
    process = subprocess.Popen(torchrun_command(resolved, nproc_per_node), env=worker_env())

    def forward(signum, _frame):
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group): let it wind down
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
