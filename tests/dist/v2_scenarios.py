"""Run by `deepspeed --num_gpus 2` from tests/test_dist_v2.py: the tiny data2vec 2.0 presets of
all three modalities pretrain on the built-in demo data in one 2-rank launch.

Writes OUT/rank{r}.json with, per modality, the per-step losses and target stds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True, help="JSON: modality -> train pattern")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--zero-steps", type=int, default=0, help="also run each preset this many steps under ZeRO 2 and 3")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()

    from d2v.config import load_template, resolve
    from d2v.train.launch import build_run

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    template = load_template(os.path.join(root, "ds_configs", "cpu.json"))
    data = json.loads(args.data)
    results: dict = {}
    for modality, pattern in data.items():
        cfg = resolve(f"{modality}_tiny_v2", overrides=[
            f"train.max_steps={args.steps}", "train.log_every=10", f"train.save_every={args.steps}",
            f"data.train_shards={pattern}", f"train.out_dir={os.path.join(args.out, modality)}"])
        run = build_run(cfg, template, console=False)
        shapes = []
        original = run.stream.next_batch

        def recording_next(original=original, shapes=shapes):
            batch = original()
            shapes.append(list(batch.mask.shape))
            return batch

        run.stream.next_batch = recording_next
        summary = run.train()
        run.close()
        results[modality] = {"losses": [h["loss"] for h in summary.history],
                             "target_std": [h["target_std"] for h in summary.history],
                             "mask_shapes": shapes[:3], "rank": run.rank, "world_size": run.world_size}
    for stage in (2, 3) if args.zero_steps else ():
        zero_template = load_template(os.path.join(root, "ds_configs", f"zero{stage}.json"))
        if stage == 3:  # partition every parameter (the tiny ones would all stay gathered otherwise)
            zero_template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        for modality, pattern in data.items():
            cfg = resolve(f"{modality}_tiny_v2", overrides=[
                f"train.max_steps={args.zero_steps}", "train.save_every=0", f"data.train_shards={pattern}",
                f"train.out_dir={os.path.join(args.out, f'{modality}_zero{stage}')}"])
            run = build_run(cfg, zero_template, console=False)
            summary = run.train()
            run.close()
            results[f"{modality}_zero{stage}"] = {"losses": [h["loss"] for h in summary.history],
                                                  "zero_stage": run.trainer.zero_stage}
    with open(os.path.join(args.out, f"rank{results[next(iter(data))]['rank']}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
    from d2v.train.distributed import shutdown

    shutdown()  # leave the process group together (see shutdown)
