"""The update loop every job runs: pretraining (d2v.train.run) and fine-tuning (d2v.finetune.runner).

One loop, so that both get the same guarantees (docs/method.md §4, "One update loop"): a
preemption request rides on the step's one synchronisation and ends in a checkpoint and exit 75
on every rank; NaN/inf windows
are skipped on every rank and too many in a row stop the run with a checkpoint of the last good
state; a run with no readable data stops with an error; checkpoints are atomic and a resume never
replaces later results; logged metrics are means over ranks, counters sums over ranks.

A job supplies the pieces that differ: `stepper` (train_step over micro-batches, step counts, its
engine and teacher), `stream` (micro-batches with a resumable position), `log_values` (what a log
line adds), `validate`, `guard`, and `run_state` (what its checkpoints carry besides the step).
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from d2v import collectives
from d2v.train import host_sync
from d2v.train.checkpoint import Checkpointer, atomic_write_text, checked_tag
from d2v.train.guarded_update import NonFiniteError, state_is_finite
from d2v.train.metrics import MetricsSink
from d2v.train.preemption import PreemptionFlag
from d2v.train.run_lock import lock_run_directory


class NoDataError(RuntimeError):
    """Updates in a row where every rank's batches were fillers: the data cannot be read."""


EXIT_NONFINITE = 3
EXIT_NO_DATA = 4


@dataclass
class RunSummary:
    steps: int
    preempted: bool
    skipped_steps: int
    first_loss: float | None
    last_loss: float | None
    out_dir: str
    checkpoint: str | None
    history: list[dict[str, Any]]


def _needs_universal(checkpointer: Checkpointer, tag: str, state: dict[str, Any], world_size: int,
                     zero_stage: int | None) -> bool:
    """A ZeRO checkpoint written at another world size or ZeRO stage is loaded through DeepSpeed's
    universal form (a stage-0 checkpoint holds whole tensors and loads anywhere)."""
    saved_stage = (state.get("identity") or {}).get("zero_stage", zero_stage)
    if state["world_size"] == world_size and saved_stage == zero_stage:
        return False
    return bool(glob.glob(os.path.join(checkpointer.root, tag, "*zero_pp_rank_*optim_states.pt")))


def with_universal_load(ds_template: dict[str, Any]) -> dict[str, Any]:
    return {**ds_template, "checkpoint": {**ds_template.get("checkpoint", {}), "load_universal": True}}


def plan_resume(checkpointer: Checkpointer, resume: str, name: str, out_dir: str,
                world_size: int, zero_stage: int | None = None) -> tuple[str | None, dict | None, bool]:
    """(tag, its run state, whether it loads through the universal form) to resume from, or
    (None, None, False) for a fresh run; everything checked before any engine exists. Refuses what
    would replace results: a fresh run where checkpoints already are, and a resume from a tag
    older than the latest (it says how to branch instead)."""
    latest = checkpointer.latest_tag()
    where = checkpointer.root
    if resume == "none":
        if latest is not None:
            raise FileExistsError(f"{where} already holds checkpoints (latest: {latest}): a fresh run there would "
                                  f"replace them. Continue it with --resume auto, or give this run a new --out")
        return None, None, False
    tag = latest if resume == "auto" else checked_tag(resume, "--resume")
    if tag is None:
        return None, None, False  # nothing saved yet: start from scratch
    later = [t for t in checkpointer.complete_tags() if re.fullmatch(r"step_\d+", t) and t > tag]
    if resume != "auto" and later:
        raise FileExistsError(
            f"checkpoint {tag} is older than {later[-1]} in {where}: continuing from it here would replace the "
            f"later results. To branch from {tag}, copy it into a new run directory and resume there: "
            f"mkdir -p NEW/checkpoints && cp -r {os.path.join(where, tag)} NEW/checkpoints/ and then "
            f"--out NEW --resume {tag}")
    state = checkpointer.run_state(tag)
    if state.get("preset") != name:
        raise ValueError(f"checkpoint {tag} in {out_dir} was written by preset {state.get('preset')!r}, "
                         f"this run is {name!r}: use another --out or the same preset")
    return tag, state, _needs_universal(checkpointer, tag, state, world_size, zero_stage)


class UpdateLoop:
    """Mixed into a job that has: cfg (cfg.name, cfg.train), stepper, stream, checkpointer, sink,
    preemption, world_size, console, last_checkpoint, validate(), and the hooks below."""

    val_every = 0  # updates between validations (0: none in the loop)
    validate_at_end = True  # also at the last step when val_every divides it (False: the job does its own)
    window_keys: tuple[str, ...] = ()  # StepMetrics values averaged over a log window
    rate_keys: tuple[str, ...] = ("samples",)  # StepMetrics values summed over a window, then over ranks

    # -- start-up, the same for every job ---------------------------------------------------------
    def open_run_directory(self, start: Callable[[str | None], None]) -> None:
        """Holds OUT/.d2v.lock before anything in the directory is read or written (released by
        close()), then runs the job's `start(lock_note)`; a start-up that fails releases it."""
        self.lock, note = lock_run_directory(self.out_dir, self.rank)
        try:
            start(note)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def plan_checkpoints(self, resume: str, zero_stage: int | None = None) -> tuple[dict[str, Any] | None, bool]:
        """Sets checkpointer and resume_tag; returns (the tag's run state, whether it loads through
        the universal form). Everything about the resume is checked before any engine exists."""
        self.checkpointer = Checkpointer(os.path.join(self.out_dir, "checkpoints"), rank=self.rank,
                                         world_size=self.world_size, keep_last=self.cfg.train.keep_last)
        self.resume_tag, state, reshard = plan_resume(self.checkpointer, resume, self.cfg.name, self.out_dir,
                                                      self.world_size, zero_stage)
        return state, reshard

    def finish_start(self, run_config: dict[str, Any], *, universal: bool, **sink_options: Any) -> None:
        """After the stepper exists: preemption handling, the resume, the metrics sink, and the
        resolved config written beside the checkpoints (rank 0)."""
        self.last_checkpoint: str | None = None
        self.preemption = PreemptionFlag(self.world_size).install()
        if self.resume_tag is not None:
            self.restore(self.resume_tag, universal=universal)
        self.sink = MetricsSink(self.out_dir, rank=self.rank, max_steps=self.cfg.train.max_steps,
                                wandb_mode=self.cfg.train.wandb, run_config=run_config,
                                start_step=self.stepper.step, **sink_options)
        if self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            atomic_write_text(os.path.join(self.out_dir, "config.json"), json.dumps(run_config, indent=2))

    def log_values(self, step: int, m, totals: dict[str, float], elapsed: float) -> dict[str, float]:
        """What a log line adds to the window means and counters (all ranks call this)."""
        return {"lr": m.values["lr"]}

    def guard(self, step: int, values: dict[str, float]) -> None:
        """Raise to stop the run on a logged value (collapse checks)."""

    def run_state(self) -> dict[str, Any]:
        """What the job's checkpoints record besides step, preset and epoch (rank 0 writes it)."""
        return {}

    def save(self) -> str:
        """An atomic checkpoint of engine, teacher (if any) and data position; all ranks call it.
        Only a finite state is ever written: a checkpoint is what a resume trusts."""
        data = self.stream.state_dict()
        stepper = self.stepper
        teacher = stepper.teacher.ema_parameters() if stepper.teacher is not None else []
        if not state_is_finite(stepper.engine, teacher, stepper.device):
            raise NonFiniteError(self._not_saved(f"at step {stepper.step} the weights, optimizer state or teacher "
                                                 f"hold NaN/inf"))
        tag = self.checkpointer.save(
            stepper.engine, stepper.teacher, stepper.step,
            run_state={"preset": self.cfg.name, "epoch": int(data.get("epoch", 0)),
                       "batches_consumed": int(data.get("batches_consumed", 0)), **self.run_state()},
            rank_state={"data": data})
        self.last_checkpoint = tag
        return tag

    def _not_saved(self, what: str) -> str:
        last = self.last_checkpoint or self.checkpointer.latest_tag()
        return (f"{what}: nothing was saved (a checkpoint is only ever a finite state); the last good checkpoint is "
                f"{last or 'none: this run saved none'}. Lower optim.lr or check the data, then resume from it")

    def restore(self, tag: str, *, universal: bool) -> None:
        """Engine, teacher, step and data position from `tag`; at another world size the data
        restarts at the recorded epoch boundary."""
        stepper = self.stepper
        run_state, side = self.checkpointer.load(stepper.engine, stepper.teacher, tag, universal=universal)
        stepper.step = int(run_state["step"])
        if side is not None:
            self.stream.load_state_dict(side["data"])
        elif hasattr(self.stream, "restart_epoch"):
            self.stream.restart_epoch(int(run_state.get("epoch", 0)))
        self.last_checkpoint = tag

    def train(self, max_steps: int | None = None) -> RunSummary:
        cfg, stepper = self.cfg, self.stepper
        stop = cfg.train.max_steps if max_steps is None else max_steps
        history: list[dict[str, Any]] = []
        self.logged: list[dict[str, float]] = []
        window: dict[str, float] = {}
        window_steps, t_window = 0, time.perf_counter()
        rates = dict.fromkeys(self.rate_keys, 0.0)  # summed over the window, then over ranks
        while stepper.step < stop:
            with host_sync.host_work():  # the data stream works on host memory only
                micro = [self.stream.next_batch() for _ in range(cfg.train.grad_accum)]
            # The stop request rides on the step's one synchronisation: every rank learns it there.
            try:
                m = stepper.train_step(micro, stop_requested=self.preemption.requested)
            except NonFiniteError as err:  # agreed on every rank: the state itself is broken
                raise NonFiniteError(self._not_saved(f"step {stepper.step}: {err}")) from None
            step = stepper.step
            history.append({"step": step, "loss": m.loss, **m.values})
            skipped = bool(m.values.get("skipped"))
            if not skipped:
                for k in self.window_keys:
                    window[k] = window.get(k, 0.0) + m.values[k]
                window["loss"] = window.get("loss", 0.0) + m.loss
                window_steps += 1
                for k in rates:
                    rates[k] += m.values[k]
                self.sink.progress(step)
                if step % cfg.train.log_every == 0 or step == stop:  # also on a step that stops the run
                    self._log_window(step, m, {k: v / window_steps for k, v in window.items()}, rates,
                                     time.perf_counter() - t_window)
                    window, window_steps, t_window = {}, 0, time.perf_counter()
                    rates = dict.fromkeys(rates, 0.0)
            if stepper.stop_agreed:
                self.sink.message(f"step {step}: {self.preemption.signal_name or 'a signal on another rank'}"
                                  f" -> checkpoint and exit for requeue")
                self.save()
                return self._summary(history, preempted=True)
            if skipped:
                self._skipped(step, m)
                continue
            if self.val_every and step % self.val_every == 0 and (self.validate_at_end or step != stop):
                val = self.validate()
                if val is not None:
                    self.sink.log(step, val, prefix="valid", console=self.console)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != stop:
                self.save()
        if self.last_checkpoint != f"step_{stepper.step:08d}":
            self.save()
        return self._summary(history, preempted=False)

    def _skipped(self, step: int, m) -> None:
        cfg, stepper = self.cfg, self.stepper
        self.sink.log(step, {"skipped_steps": m.values["skipped_steps"], "empty": m.values["empty"]},
                      prefix="skip", console=self.console)
        if stepper.consecutive_empty >= cfg.train.max_consecutive_skips:
            counters = {k: int(v) for k, v in self.stream.counters().items() if v}
            raise NoDataError(
                f"{stepper.consecutive_empty} updates in a row (to step {step}) had no readable sample on any "
                f"rank, only filler batches ({counters}): the training data cannot be read; check it (the log "
                f"names each damaged shard) or re-run prepare")
        if stepper.consecutive_skips >= cfg.train.max_consecutive_skips:
            tag = self.save()
            raise NonFiniteError(
                f"{stepper.consecutive_skips} updates in a row had a NaN/inf loss or gradient (at step {step}); "
                f"stopped with checkpoint {tag} of the last good state: lower optim.lr, check the data, "
                f"or raise train.max_consecutive_skips")

    def _log_window(self, step: int, m, values: dict[str, float], rates: dict[str, float], elapsed: float) -> None:
        counters = {k: float(v) for k, v in self.stream.counters().items()}
        # Which shards each rank found damaged (one entry per shard): summed, a shard two ranks met
        # still counts once.
        damaged = list(getattr(self.stream, "damaged_shards", lambda: [])())
        # One collective for the window: means of the metrics, sums of samples and counters.
        keys, rkeys, ckeys = sorted(values), sorted(rates), sorted(counters)
        summed = collectives.all_reduce_values([values[k] for k in keys] + [rates[k] for k in rkeys] +
                                               [counters[k] for k in ckeys] + damaged)
        values = {k: v / self.world_size for k, v in zip(keys, summed)}
        at = len(keys) + len(rkeys)
        totals = dict(zip(rkeys, summed[len(keys):at]))
        counters = dict(zip(ckeys, summed[at:at + len(ckeys)]))
        if damaged:
            counters["bad_shards"] = float(sum(v > 0 for v in summed[at + len(ckeys):]))
        counters["skipped_steps"] = float(self.stepper.skipped_steps)
        values.update(**self.log_values(step, m, totals, elapsed), **counters)
        self.sink.log(step, values, console=self.console)
        self.logged.append({"step": step, **values})
        self.guard(step, values)

    def _summary(self, history: list[dict[str, Any]], *, preempted: bool) -> RunSummary:
        losses = [h["loss"] for h in history if not h.get("skipped")]
        return RunSummary(self.stepper.step, preempted, self.stepper.skipped_steps, losses[0] if losses else None,
                          losses[-1] if losses else None, self.out_dir, self.last_checkpoint, history)
