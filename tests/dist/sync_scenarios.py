"""Run by `deepspeed --num_gpus 2` from tests/test_host_sync.py: counts host-device
synchronisations per step of tiny presets through the real run loop at world size 2.

Writes OUT/rank{r}.json: a list of {preset, zero, precision, groups, steps: [[step, log, count, kinds]]}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def count_case(preset: str, zero: int, out: str, steps: int, log_every: int) -> dict:
    from d2v.config import resolve
    from d2v.train.launch import build_run
    from d2v.train.sync_budget import count_run_syncs

    cfg = resolve(preset, overrides=[f"train.max_steps={steps + 2}", f"train.log_every={log_every}", "train.save_every=0",
                                     "train.val_every=0", f"train.out_dir={os.path.join(out, f'{preset}_z{zero}')}"])
    run = build_run(cfg, {"zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True}, console=False)
    # Warm-up, uncounted: ZeRO-3 records its parameter-fetch trace in the first steps and checks
    # it across ranks once (a list broadcast per module list).
    for _ in range(2):
        run.trainer.train_step([run.stream.next_batch() for _ in range(cfg.train.grad_accum)])
    counted, _ = count_run_syncs(run, steps)
    groups = len(run.trainer.engine.optimizer.param_groups)
    run.close()
    return {"preset": preset, "zero": zero, "precision": cfg.train.precision, "groups": groups,
            "steps": [[s.step, s.log_step, s.count, s.kinds] for s in counted]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", required=True, help="JSON list of [preset, zero]")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()

    from d2v.train import distributed

    rank, _ = distributed.init_distributed()
    results = [count_case(p, z, args.out, args.steps, args.log_every) for p, z in json.loads(args.cases)]
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
