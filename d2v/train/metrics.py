"""One sink for the fixed set of run metrics: console (with a progress bar when
interactive), JSONL always, TensorBoard, and wandb only when asked (offline by default).
Only rank 0 writes; values are averaged over ranks before they get here.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

CONSOLE_KEYS = (
    ("loss", "loss", "{:.4f}"), ("target_std", "tstd", "{:.3f}"), ("pred_std", "pstd", "{:.3f}"),
    ("mask_rate", "mask", "{:.3f}"), ("ema_decay", "ema", "{:.5f}"), ("lr", "lr", "{:.2e}"),
    ("grad_norm", "gnorm", "{:.3f}"), ("model_norm", "|w|", "{:.1f}"), ("ema_norm", "|ema|", "{:.1f}"),
    ("samples_per_s", "samples/s", "{:.1f}"), ("positions_per_s", "{positions}/s", "{:.0f}"),
    ("tflops_per_device", "TFLOP/s", "{:.2f}"), ("mfu", "MFU", "{:.1%}"), ("peak_mem_gib", "mem GiB", "{:.2f}"),
    ("skipped_samples", "skipped", "{:.0f}"),
)


def format_line(step: int, values: dict[str, Any], positions_name: str = "positions") -> str:
    parts = [f"step {step:>6}"]
    for key, label, fmt in CONSOLE_KEYS:
        if key in values and values[key] is not None and not (isinstance(values[key], float) and math.isnan(values[key])):
            parts.append(f"{label.format(positions=positions_name)} {fmt.format(values[key])}")
    return " | ".join(parts)


class MetricsSink:
    def __init__(self, out_dir: str, *, rank: int, max_steps: int, wandb_mode: str = "disabled",
                 run_config: dict[str, Any] | None = None, tensorboard: bool = True, start_step: int = 0,
                 positions_name: str = "positions") -> None:
        self.active = rank == 0
        self.positions_name = positions_name
        self.out_dir = out_dir
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        if not self.active:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: skipping TensorBoard events", file=sys.stderr)
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_MODE", wandb_mode)  # offline unless the user asked for online
            try:
                import wandb
            except ImportError:
                raise ImportError(f"train.wandb={wandb_mode} needs wandb: pip install 'd2v[wandb]' "
                                  f"(or leave train.wandb=disabled)") from None

            self._wandb = wandb.init(project="d2v", dir=out_dir, mode=wandb_mode, config=run_config or {})
        if sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, dynamic_ncols=True, leave=False)

    def progress(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def log(self, step: int, values: dict[str, Any], *, prefix: str = "train", console: bool = True) -> None:
        if not self.active:
            return
        record = {"step": step, "split": prefix, "time": time.time(), **values}
        try:
            self._jsonl.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: said as one, with where (the step's metrics are lost)
            raise OSError(err.errno, f"cannot append step {step}'s metrics to {self._jsonl.name} "
                                     f"({err.strerror}): free space there, then resume with --resume auto") from None
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)
        if console:
            line = format_line(step, values, self.positions_name) if prefix == "train" else f"step {step:>6} | {prefix} " + " | ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)

    def message(self, text: str) -> None:
        if self.active:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl.close()
