"""Preemption (docs/method.md §4): a signal only sets a flag; the run loop all-reduces it once per step
so every rank stops at the same step, fetches nothing more, checkpoints and exits with
EXIT_PREEMPTED. The deepspeed launcher sends SIGTERM to each rank's process tree and SIGKILLs
after about 30 s; Slurm can send SIGUSR1 ahead of time (`--signal=USR1@90`).
"""
from __future__ import annotations

import signal
import threading

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the Slurm example requeues on it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requested = True  # nothing else: the loop decides, at a step boundary, on every rank
        self.signal_name = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (one small all-reduce per step)."""
        if self.world_size == 1:
            return self.requested
        import deepspeed.comm as dist

        t = torch.tensor([1.0 if self.requested else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)
