"""Preemption: SIGTERM or SIGUSR1 ends the run at the next step boundary with a checkpoint.

The handler only records the signal (a handler may run between any two bytecodes, in
the middle of a collective). At each step boundary the ranks agree: the run stops if
any rank has seen a signal, so every rank saves the same step and leaves the loop
together. Schedulers send SIGTERM (Kubernetes; torchrun passes it on) or a chosen
signal ahead of the end (Slurm's `--signal=USR1@90`: slurm/common.sh passes it on, and
torchrun does with `--signals_to_handle=...,SIGUSR1`).
"""
from __future__ import annotations

import functools
import signal
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # the signals seen while `handles_preemption` is active


def _record(signum, _frame) -> None:
    _received.append(signum)


def handles_preemption(train):
    """Decorator: while `train` runs (in the main thread), SIGTERM/SIGUSR1 are recorded, not fatal."""
    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # signal handlers live there only
            return train(*args, **kwargs)
        _received.clear()
        previous = {sig: signal.signal(sig, _record) for sig in SIGNALS}
        try:
            return train(*args, **kwargs)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapper


def requested(strategy) -> str | None:
    """The signal some rank received, by name (the same answer on every rank), or None. A collective.

    Across ranks this is one small all-reduce (and a host sync) per step; alone, no sync.
    """
    seen = strategy.all_reduce_sum(torch.tensor([float(sig in _received) for sig in SIGNALS]))
    names = [sig.name for sig, count in zip(SIGNALS, seen.tolist()) if count > 0]
    return names[0] if names else None
