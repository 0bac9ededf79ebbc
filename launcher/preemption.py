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


class PreemptionCheck:
    """Whether some rank received a signal, the same answer on every rank, asked once per step boundary.

    One process reads its own flag. Several start an all-reduce of their flags at each
    boundary and read the previous boundary's result, copied to pinned host memory
    behind a CUDA event: it arrived long ago, so the read stalls nothing (a blocking
    read would cost a host sync every step). All ranks read the same reduced value at
    the same boundary, so all stop together, one step after the signal.
    """

    def __init__(self, strategy):
        self.strategy = strategy
        cuda = strategy.world_size > 1 and strategy.device.type == "cuda"  # one process reads its own flag
        # the last boundary's reduced flags land here; read only after `_arrived` (CUDA) has passed
        self._host = torch.zeros(len(SIGNALS), pin_memory=cuda)
        self._arrived = torch.cuda.Event() if cuda else None
        self._pending = False

    def __call__(self) -> str | None:
        local = [float(sig in _received) for sig in SIGNALS]
        if self.strategy.world_size == 1:
            return _first_signal(local)
        agreed = self._collect()
        reduced = self.strategy.all_reduce_sum(torch.tensor(local, device=self.strategy.device))
        self._host.copy_(reduced, non_blocking=self._arrived is not None)
        if self._arrived is not None:
            self._arrived.record()
        self._pending = True
        return agreed

    def _collect(self) -> str | None:
        if not self._pending:
            return None
        if self._arrived is not None:
            self._arrived.synchronize()
        return _first_signal(self._host.tolist())


def _first_signal(counts: list[float]) -> str | None:
    names = [sig.name for sig, count in zip(SIGNALS, counts) if count > 0]
    return names[0] if names else None
