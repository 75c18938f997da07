"""One rank of gpu_check's two-rank runs: a few updates of a preset through the real run loop.

  deepspeed --num_gpus 2 benchmarks/gpu_check_ranks.py --preset audio_tiny --zero 3 --out DIR
  (or two processes with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set, e.g. --backend cuda:gloo)

`--backend` creates the default process group with that torch backend (a device map such as
"cuda:gloo" included) before d2v's setup, which then adopts it: two ranks can share one GPU
over gloo, which NCCL refuses. Writes OUT/rank{r}.json: losses, samples/s, the host-device
synchronisations of each counted update with their budget, and under ZeRO-3 the teacher's bytes
on this rank with the counted figure. A failure is written there too ({"error": ...}).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # d2v from this checkout


def run_rank(args) -> dict:
    import torch

    from benchmarks.common import sync
    from benchmarks.gpu_check import counted_teacher_bytes, teacher_tensor_bytes
    from d2v.config import resolve
    from d2v.train.launch import build_run
    from d2v.train.sync_budget import budget, count_run_syncs

    overrides = [f"train.max_steps={2 * args.steps + 2}", "train.log_every=2", "train.save_every=0", "train.val_every=0",
                 f"train.out_dir={os.path.join(args.out, 'run')}"]
    cfg = resolve(args.preset, overrides=overrides)
    template = {"zero_optimization": {"stage": args.zero}, "zero_allow_untested_optimizer": True}
    run = build_run(cfg, template, console=False)
    trainer = run.trainer
    losses, skipped = [], 0
    m = trainer.train_step([run.stream.next_batch() for _ in range(cfg.train.grad_accum)])  # warm-up
    losses.append(float(m.loss))
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        m = trainer.train_step([run.stream.next_batch() for _ in range(cfg.train.grad_accum)])
        losses.append(float(m.loss))
        skipped += bool(m.values.get("skipped"))
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    groups = len(trainer.engine.optimizer.param_groups)
    from d2v.train import distributed

    counts, _ = count_run_syncs(run, args.steps, device_view=distributed.on_cpu())
    out = {"rank": trainer.rank, "world_size": trainer.world_size, "zero": trainer.zero_stage,
           "precision": cfg.train.precision, "backend": torch.distributed.get_backend(), "steps": args.steps,
           "group_from": "--backend" if args.backend else "d2v",
           "losses": losses + ([float("nan")] if skipped else []),
           "samples_per_s": cfg.train.micro_batch_size * cfg.train.grad_accum * trainer.world_size / step_s,
           "syncs": [{"step": s.step, "log_step": s.log_step, "count": s.count, "kinds": s.kinds,
                      "budget": budget(trainer.zero_stage, cfg.train.precision, log_step=s.log_step,
                                       param_groups=groups)} for s in counts]}
    if trainer.zero_stage == 3:
        out["teacher_bytes"] = teacher_tensor_bytes(trainer)
        out["teacher_bytes_counted"] = counted_teacher_bytes(args.preset, overrides, trainer.world_size)
    run.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="audio_tiny")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", default=None, help="e.g. cuda:gloo: the process group's torch backend")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()

    import torch

    from d2v.train import distributed

    distributed.map_launcher_env()
    rank = int(os.environ["RANK"])
    if args.backend:
        if torch.cuda.is_available():
            torch.cuda.set_device(distributed.device())
        torch.distributed.init_process_group(args.backend, init_method="env://", rank=rank,
                                             world_size=int(os.environ["WORLD_SIZE"]))
    try:
        result = run_rank(args)
    except Exception as e:
        traceback.print_exc()
        result = {"rank": rank, "error": f"{type(e).__name__}: {e}".splitlines()[0][:400]}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if "error" in result:
        sys.exit(1)  # the launcher (or gpu_check) stops the peer, which may wait in a collective
    distributed.shutdown()


if __name__ == "__main__":
    main()
