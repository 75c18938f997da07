"""One run per directory: `OUT/.d2v.lock`, created atomically (O_EXCL, which NFS v3+ and Lustre
honour) by rank 0 before it reads or writes anything there, and kept alive by a heartbeat.

A second run sees the lock and is refused with who holds it. A run killed with -9 leaves the file
behind, but not for ever: on the same host its pid is gone, so the lock is taken over at once; from
another host it is taken over once its heartbeat is older than `stale_after_s` (the age is measured
against the file system's own clock, through a probe file, since the hosts' clocks may differ).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

LOCK_NAME = ".d2v.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    def __init__(self, directory: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # vanished, or half-written by a run that is creating it now

    def _age(self) -> float:
        """Seconds since the holder's last heartbeat, on the file system's clock."""
        probe = os.path.join(self.directory, f".d2v.lock.probe.{socket.gethostname()}.{os.getpid()}")
        with open(probe, "w"):
            pass
        try:
            return os.stat(probe).st_mtime - os.stat(self.path).st_mtime
        finally:
            os.unlink(probe)

    def _stale(self, holder: dict | None) -> str | None:
        """Why the current lock may be taken over, or None while its run may be alive."""
        if holder is None:
            return None
        if holder.get("host") == self.owner["host"]:
            pid = int(holder.get("pid", -1))
            if pid == self.owner["pid"]:  # an earlier run of this process (one engine per process)
                return "an earlier run of this process"
            if not _pid_alive(pid):
                return f"its process {pid} on this host is gone"
        age = self._age()
        if age > self.stale_after_s:
            return f"its heartbeat stopped {age:.0f} s ago"
        return None

    def acquire(self) -> str | None:
        """Takes the lock; returns a note when a dead run's lock was taken over. Raises
        FileExistsError naming the live holder, ValueError for a directory it cannot write."""
        try:
            return self._acquire()
        except PermissionError as err:
            raise ValueError(f"{self.directory} cannot be written ({err.strerror}): give the run a writable "
                             f"--out") from None

    def _acquire(self) -> str | None:
        os.makedirs(self.directory, exist_ok=True)
        note = None
        for _ in range(3):
            if self._create():
                break
            holder = self._holder()
            why = self._stale(holder)
            if why is None:
                if holder is None:
                    time.sleep(0.2)  # being written by a run that starts right now
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                raise FileExistsError(
                    f"{self.directory} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"started {since}): two runs in one directory would mix their checkpoints and logs. Give this "
                    f"run another --out; if that run is dead, its lock is taken over once it is "
                    f"{self.stale_after_s:.0f} s old (or delete {self.path})")
            # Aside first, then create: of two runs taking over at once, one rename wins.
            aside = f"{self.path}.stale.{os.getpid()}"
            try:
                os.rename(self.path, aside)
                os.unlink(aside)
            except FileNotFoundError:
                pass
            note = f"took over the lock of a dead run (pid {holder.get('pid')} on {holder.get('host')}: {why})"
        else:
            raise FileExistsError(f"{self.path} could not be created: another run holds {self.directory}")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="d2v-run-lock", daemon=True)
        self._thread.start()
        return note

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or flaky file system: the run goes on; a stale lock is only taken over later

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder is not None and holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            os.unlink(self.path)
        self.held = False


def lock_run_directory(directory: str, rank: int) -> tuple[RunLock | None, str | None]:
    """Rank 0 takes the directory's lock; every rank learns the outcome (a collective), so that a
    refused run stops on every rank with rank 0's reason. Returns (the lock on rank 0, a note)."""
    from d2v import collectives

    lock, note, error = None, None, None
    if rank == 0:
        lock = RunLock(directory)
        try:
            note = lock.acquire()
        except (FileExistsError, ValueError) as err:
            error = err
    if collectives.any_rank(error is not None):
        raise error or FileExistsError(f"{directory}: rank 0 could not take the run's lock (its message says why)")
    return lock, note
