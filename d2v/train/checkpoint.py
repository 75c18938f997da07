"""Checkpoints that survive partial writes (docs/method.md §4).

Layout of `ROOT/TAG/` (TAG = step_00001234):
  DeepSpeed's own files (model, optimizer, scheduler; written with save_latest=False),
  teacher.pt        the fp32 EMA teacher, world-size independent (written by rank 0),
  rank_00000.pt ... per-rank side files: RNG states and the data-loader position (under
                    ZeRO-1/2 DeepSpeed keeps `client_state` from rank 0 only),
  d2v_state.json    step, world size, preset and the resolved config,
  COMPLETE          written last, after a barrier: only complete tags are ever loaded.
Everything is first written into `ROOT/TAG.partial/`, which is renamed to `ROOT/TAG` once
complete; `ROOT/latest` names the newest complete tag and is replaced atomically (write +
rename) only after that. A failure at any point of a save therefore leaves the previous
checkpoint loadable and `latest` pointing at it; leftovers of a failed save are removed by the
next one. Older tags beyond `keep_last` are pruned last.

`fault_hook(stage)` is called at every stage of a save (tests raise from it to inject faults).
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

from d2v import collectives, safe_load

LATEST = "latest"
COMPLETE = "COMPLETE"
PARTIAL = ".partial"
UNIVERSAL = ".universal"
SAVE_STAGES = ("start", "deepspeed", "rank_state", "teacher", "run_state", "complete", "rename", "latest", "prune")


_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def checked_tag(tag: str, source: str) -> str:
    """A tag names a folder inside the run's checkpoints/: a plain name, no path separator, no
    `..`, no `.partial` (an unfinished save). `source` says where the name came from."""
    if not _TAG.fullmatch(tag) or ".." in tag or tag.endswith(PARTIAL):
        raise ValueError(f"{source} names {tag!r}, which is not a checkpoint tag of this run (a plain name such as "
                         f"step_00001000, inside its checkpoints/ folder)")
    return tag


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write_bytes(path: str, write) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str) -> None:
    _atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write_bytes(path, lambda f: f.write(text.encode()))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def disk_full(err: BaseException, root: str) -> bool:
    """Whether a failed write failed for lack of space: ENOSPC, or (C++ streams carry no errno)
    a write error with almost nothing left on that device."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(root).free < 64 * 2**20
    except OSError:
        return False


class Checkpointer:
    def __init__(self, root: str, *, rank: int, world_size: int, keep_last: int = 3) -> None:
        self.root = root
        self.rank = rank
        self.world_size = world_size
        self.keep_last = max(1, keep_last)
        self.fault_hook = None  # callable(stage) for fault-injection tests

    def _stage(self, name: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(name)

    def _barrier(self) -> None:
        if self.world_size > 1:
            collectives.barrier()

    def complete_tags(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(t for t in os.listdir(self.root)
                      if not t.endswith(PARTIAL) and os.path.exists(os.path.join(self.root, t, COMPLETE)))

    def _latest_name(self) -> str | None:
        path = os.path.join(self.root, LATEST)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return f.read().strip()

    def latest_tag(self) -> str | None:
        path = os.path.join(self.root, LATEST)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            tag = checked_tag(f.read().strip(), path)
        if not os.path.exists(os.path.join(self.root, tag, COMPLETE)):
            raise ValueError(f"{path} names {tag!r}, which is not a complete d2v checkpoint (written by another "
                             f"tool or an older d2v): move {self.root} aside or give this run a new --out")
        return tag

    def save(self, engine, teacher, step: int, *, run_state: dict[str, Any], rank_state: dict[str, Any]) -> str:
        """Every rank calls this. Returns the tag written. A full disk is reported as one (torch's
        writer says only "iostream error"); `latest` keeps naming the previous checkpoint."""
        try:
            return self._save(engine, teacher, step, run_state=run_state, rank_state=rank_state)
        except (OSError, RuntimeError) as err:
            if not disk_full(err, self.root):
                raise
            raise OSError(errno.ENOSPC, f"no space left on the device of {self.root} while writing checkpoint "
                                        f"{tag_for(step)} ({shutil.disk_usage(self.root).free / 2**20:.0f} MiB free): "
                                        f"free space or use another --out, then resume with --resume auto "
                                        f"(latest still names {self._latest_name()})") from err

    def _save(self, engine, teacher, step: int, *, run_state: dict[str, Any], rank_state: dict[str, Any]) -> str:
        tag = tag_for(step)
        final = os.path.join(self.root, tag)
        if os.path.exists(os.path.join(final, COMPLETE)) and self._latest_name() == tag:
            return tag  # this step is the current checkpoint already (a run resumed and stopped at once)
        partial = final + PARTIAL
        self._stage("start")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            # Leftovers of an interrupted save of this step; a complete one that `latest` never
            # named belongs to a history that was rolled back.
            for stale in (partial, final):
                if os.path.isdir(stale):
                    shutil.rmtree(stale)
        self._barrier()
        self._stage("deepspeed")
        engine.save_checkpoint(self.root, tag=tag + PARTIAL, client_state={"d2v_step": step}, save_latest=False)
        os.makedirs(partial, exist_ok=True)
        self._stage("rank_state")
        atomic_torch_save({"rng": rng_state(), **rank_state}, os.path.join(partial, f"rank_{self.rank:05d}.pt"))
        teacher_state = teacher.export_state() if teacher is not None else None  # collective under ZeRO-3
        self._stage("teacher")
        if self.rank == 0:
            if teacher_state is not None:  # fine-tuning has no teacher
                atomic_torch_save(teacher_state, os.path.join(partial, "teacher.pt"))
            self._stage("run_state")
            state = {"step": step, "world_size": self.world_size, **run_state}
            atomic_write_text(os.path.join(partial, "d2v_state.json"), json.dumps(state, indent=2))
        self._barrier()
        if self.rank == 0:
            self._stage("complete")
            atomic_write_text(os.path.join(partial, COMPLETE), "")
            self._stage("rename")
            os.rename(partial, final)
            self._stage("latest")
            atomic_write_text(os.path.join(self.root, LATEST), tag)
            self._stage("prune")
            self._prune(keep=tag)
        self._barrier()
        return tag

    def _prune(self, keep: str) -> None:
        for name in os.listdir(self.root):
            if name.endswith(PARTIAL):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        tags = self.complete_tags()
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
                shutil.rmtree(os.path.join(self.root, old + UNIVERSAL), ignore_errors=True)

    def run_state(self, tag: str) -> dict[str, Any]:
        """The d2v state of a complete tag (read before any engine exists)."""
        tag_dir = os.path.join(self.root, tag)
        if not os.path.exists(os.path.join(tag_dir, COMPLETE)):
            raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint")
        with open(os.path.join(tag_dir, "d2v_state.json")) as f:
            return json.load(f)

    def universal_tag(self, tag: str) -> str:
        """DeepSpeed's world-size-independent ("universal") form of a ZeRO checkpoint, converted
        once by rank 0 and cached beside it; every rank calls this."""
        target = os.path.join(self.root, tag + UNIVERSAL)
        if self.rank == 0 and not os.path.exists(os.path.join(target, COMPLETE)):
            import argparse

            from deepspeed.checkpoint import ds_to_universal

            from d2v.train.safe_checkpoint_engine import guard_deepspeed_readers

            guard_deepspeed_readers()  # the converter reads every file of the tag itself

            if os.path.isdir(target):
                shutil.rmtree(target)
            ds_to_universal.main(argparse.Namespace(
                input_folder=os.path.join(self.root, tag), output_folder=target, num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
            atomic_write_text(os.path.join(target, COMPLETE), "")
        self._barrier()
        return tag + UNIVERSAL

    def load(self, engine, teacher, tag: str, *, universal: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restores engine and teacher; returns (run_state, this rank's side state or None if the
        world size changed, in which case the data restarts at the recorded epoch boundary).
        universal: load the student and optimizer from the converted form (another world size)."""
        from d2v.train.safe_checkpoint_engine import install_safe_checkpoint_engine

        run_state = self.run_state(tag)
        tag_dir = os.path.join(self.root, tag)
        install_safe_checkpoint_engine(engine)  # idempotent: DeepSpeed's reads go through safe_load too
        path, _ = engine.load_checkpoint(self.root, tag=self.universal_tag(tag) if universal else tag,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {tag_dir}")
        if teacher is not None:
            teacher.load_state(safe_load.load(os.path.join(tag_dir, "teacher.pt")))
        side = None
        if run_state["world_size"] == self.world_size:
            side = safe_load.load(os.path.join(tag_dir, f"rank_{self.rank:05d}.pt"))
            set_rng_state(side["rng"])
        return run_state, side
