"""Preemption: a signal only sets a flag; the training step agrees on it across ranks (with its
skip decision, no extra synchronisation) so every rank stops at the same step, fetches nothing more, checkpoints and exits with
EXIT_PREEMPTED. The deepspeed launcher sends SIGTERM to each rank's process tree and SIGKILLs
after about 30 s; Slurm can send SIGUSR1 ahead of time (`--signal=USR1@90`).
"""
from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the Slurm example requeues on it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Set by a rank that a launcher started: its launcher's pid. A rank whose launcher is gone (killed
# alone, as `kill PID` or a container stop does) would otherwise train on unattended.
_launcher_pid: int | None = None
_LAUNCHER_ENV = ("LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
PR_SET_PDEATHSIG = 1


def watch_launcher() -> None:
    """Called first thing by the entry points: when a launcher (deepspeed, torchrun, srun, mpirun:
    they set one of _LAUNCHER_ENV) started this rank, its death is a preemption. Linux sends
    SIGTERM then (PR_SET_PDEATHSIG); elsewhere the flag notices the new parent at the next step."""
    global _launcher_pid
    if not any(k in os.environ for k in _LAUNCHER_ENV):
        return  # started by hand: a closed terminal is not a preemption (nohup users expect that)
    _launcher_pid = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the parent check below still sees it
    if os.getppid() != _launcher_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def launcher_gone() -> bool:
    return _launcher_pid is not None and os.getppid() != _launcher_pid


_held_build_locks: set[str] = set()


def release_build_locks_at_startup_exit() -> None:
    """torch's JIT extension builds (DeepSpeed's ops; its CPU accelerator loads its shared-memory
    all-reduce at every start, running ninja under the lock) hold a lock file, and every later
    start on the machine waits for that file forever. The start-up exit below skips the lock's
    release, so the locks this process holds are tracked here and removed there."""
    from torch.utils import file_baton

    baton = file_baton.FileBaton
    if getattr(baton, "_d2v_tracked", False):
        return
    acquire, release = baton.try_acquire, baton.release

    def tracked_acquire(self) -> bool | None:
        got = acquire(self)
        if got:
            _held_build_locks.add(self.lock_file_path)
        return got

    def tracked_release(self) -> None:
        _held_build_locks.discard(self.lock_file_path)
        release(self)

    baton.try_acquire, baton.release, baton._d2v_tracked = tracked_acquire, tracked_release, True


def _remove_held_build_locks() -> None:
    for path in list(_held_build_locks):
        try:
            os.remove(path)
        except OSError:
            pass


def exit_on_signal_during_startup() -> None:
    """Installed first thing by the launcher (before torch is imported): a signal while the run is
    still loading (imports, data index, engine, resume) has no step to stop at and nothing new to
    save, so the process leaves at once with EXIT_PREEMPTED and the job is requeued. The run's
    PreemptionFlag replaces this handler once its loop can checkpoint."""
    def leave(signum, frame) -> None:
        try:
            sys.stderr.write(f"{signal.Signals(signum).name} during start-up: exit {EXIT_PREEMPTED} for requeue\n")
            sys.stderr.flush()
        finally:  # even if stderr was mid-write when the signal came
            _remove_held_build_locks()
            os._exit(EXIT_PREEMPTED)  # no cleanup can block: no process group or engine to wind down yet

    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, leave)


class PreemptionFlag:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        if not self._requested and launcher_gone():
            self._requested, self.signal_name = True, "the launcher's death"
        return self._requested

    @requested.setter
    def requested(self, value: bool) -> None:
        self._requested = value

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
        self._requested = True  # nothing else: the loop decides, at a step boundary, on every rank
        self.signal_name = signal.Signals(signum).name + (" (the launcher is gone)" if launcher_gone() else "")

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (a collective: all ranks call it). The
        training loop does not call this: the request travels in the step's own decision."""
        from d2v import collectives

        return collectives.any_rank(self.requested)
