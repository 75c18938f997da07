"""Run by `deepspeed --num_gpus 2` from tests/test_dist_pretrain.py: several pretraining
scenarios in one 2-rank launch (a launch costs seconds; cases inside it cost little).

Writes OUT/rank{r}.json with, per scenario, the per-step losses and what the stream read.
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
    ap.add_argument("--data", default="")
    ap.add_argument("--val-data", default="")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from d2v.config import load_template, resolve
    from d2v.train.launch import build_run

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    template = load_template(os.path.join(root, "ds_configs", "cpu.json"))
    half = args.steps // 2
    common = [f"train.max_steps={args.steps}", "train.log_every=10", "data.num_workers=1"]
    if args.data:
        common.append(f"data.train_shards={args.data}")
    if args.val_data:
        common += [f"data.val_shards={args.val_data}", f"train.val_every={half}"]
    results: dict = {}

    def scenario(name: str, overrides: list[str], *, stop: int | None = None, resume: str = "none") -> dict:
        cfg = resolve("audio_tiny", overrides=common + overrides + [f"train.out_dir={os.path.join(args.out, name)}"])
        run = build_run(cfg, template, resume=resume, console=False)
        keys: list[str] = []
        original = run.stream.next_batch

        def recording_next():
            batch = original()
            keys.extend(batch.keys)
            return batch

        run.stream.next_batch = recording_next
        start = run.trainer.step
        summary = run.train(max_steps=stop)
        run.close()
        return {"start": start, "losses": [h["loss"] for h in summary.history], "keys": keys,
                "target_std": [h["target_std"] for h in summary.history], "checkpoint": summary.checkpoint,
                "counters": run.stream.counters(), "rank": run.rank, "world_size": run.world_size}

    results["full"] = scenario("full", [f"train.save_every={half}"])
    results["first_half"] = scenario("resumed", [f"train.save_every={half}"], stop=half)
    results["second_half"] = scenario("resumed", [f"train.save_every={half}"], resume="auto")
    rank = results["full"]["rank"]
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
