"""Host-device synchronisations per training step, counted through the real run loop.

The budget a step should stay within: one synchronisation of d2v's own (the agreed skip/stop
decision, which also brings the step's metrics back), plus what DeepSpeed's optimizer needs for
the ZeRO stage and precision at hand (its gradient-norm reads for clipping), plus a small
constant at log steps (weight norms, the gradient norm, the window's all-reduce). Nothing may
scale with the number of parameters. Used by the tests (CPU, counted in device view) and by the
GPU check (counted on the device).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from d2v.train import host_sync

# DeepSpeed's own waits per update, by (ZeRO stage, precision), as (fixed, per parameter group),
# with the settings d2v chooses (bf16 overflow checks off: d2v decides finiteness; timers off).
# docs/method.md §4 ("What a step waits for") lists each with its source line and why it stays.
# ZeRO 0 bf16 reads each group's gradient norm twice (deepspeed/runtime/utils.py get_global_norm,
# for clipping). ZeRO 1/2 build one tensor from host data per group (get_grad_norm_direct's
# mask_nan_or_inf_with_val_inplace: torch.tensor(-1.0, device=...)), check each group's clip norm
# once when clipping is on (unscale_and_clip_grads) and, in fp32, read the global norm once more.
# ZeRO 3 builds one such tensor and reads the global norm once.
DEEPSPEED_PER_STEP = {(0, "bf16"): (0, 2), (0, "fp32"): (0, 0), (1, "bf16"): (0, 2), (2, "bf16"): (0, 2),
                      (1, "fp32"): (1, 2), (2, "fp32"): (1, 2), (3, "bf16"): (2, 0), (3, "fp32"): (2, 0)}
D2V_PER_STEP = 1
# weight norms (one read), gradient norm (one read), the window's all-reduce (one read)
LOG_STEP_EXTRA = 3
# ZeRO-3 re-validates its parameter-fetch trace across ranks whenever the module order changes
# (LayerDrop changes it every step): a few list broadcasts, each read back once.
ZERO3_TRACE_CHECKS = 3


def budget(zero_stage: int, precision: str, *, log_step: bool, param_groups: int = 1) -> int:
    fixed, per_group = DEEPSPEED_PER_STEP.get((zero_stage, precision), (1, 2))
    n = D2V_PER_STEP + fixed + per_group * param_groups
    if zero_stage == 3:
        n += ZERO3_TRACE_CHECKS
    return n + (LOG_STEP_EXTRA if log_step else 0)


@dataclass
class StepSyncs:
    step: int
    log_step: bool
    count: int
    kinds: dict[str, int]


def count_run_syncs(run: Any, steps: int, *, device_view: bool | None = None,
                    sites: bool = False) -> tuple[list[StepSyncs], host_sync.HostSyncCounter]:
    """Runs `steps` more updates of a built `Run` (its saves left out) and returns what each loop
    iteration synchronised. Iteration i spans from the start of update i to the start of update
    i+1, so it includes that update's logging."""
    trainer = run.trainer
    marks: list[tuple[int, dict[str, int]]] = []
    original_step = trainer.train_step
    counter_ref: list[host_sync.HostSyncCounter] = []

    def marked_step(*args, **kwargs):
        c = counter_ref[0]
        marks.append((c.total, dict(c.counts)))
        return original_step(*args, **kwargs)

    trainer.train_step = marked_step
    original_save = run.save
    run.save = lambda: run.last_checkpoint
    start = trainer.step
    try:
        with host_sync.count_host_syncs(device_view, sites=sites) as counter:
            counter_ref.append(counter)
            run.train(max_steps=start + steps)
        marks.append((counter.total, dict(counter.counts)))
    finally:
        trainer.train_step = original_step
        run.save = original_save
    out = []
    log_every = run.cfg.train.log_every
    for i in range(len(marks) - 1):
        step = start + i + 1
        kinds = {k: marks[i + 1][1].get(k, 0) - marks[i][1].get(k, 0) for k in marks[i + 1][1]}
        out.append(StepSyncs(step, step % log_every == 0 or step == start + steps, marks[i + 1][0] - marks[i][0],
                             {k: v for k, v in kinds.items() if v}))
    return out, counter
