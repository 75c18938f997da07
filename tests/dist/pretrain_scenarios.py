"""Run by `deepspeed --num_gpus 2` from tests/test_dist_pretrain.py: several pretraining
scenarios in one 2-rank launch (a launch costs seconds; cases inside it cost little).

Writes OUT/rank{r}.json with, per scenario, the per-step losses, what the stream read and its
counters.
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
    ap.add_argument("--data", required=True, help="JSON: modality -> [train pattern, valid pattern]")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--resumed-steps", type=int, default=10, help="steps the resumed runs go on for")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()

    from d2v.config import load_template, resolve
    from d2v.train.launch import build_run

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    template = load_template(os.path.join(root, "ds_configs", "cpu.json"))
    data = json.loads(args.data)
    half = args.steps // 2
    results: dict = {}

    def scenario(name: str, preset: str, patterns, overrides: list[str], *, stop: int | None = None,
                 resume: str = "none") -> dict:
        train, valid = patterns
        cfg = resolve(preset, overrides=[f"train.max_steps={args.steps}", "train.log_every=10",
                                         f"data.train_shards={train}", f"data.val_shards={valid or ''}",
                                         f"train.out_dir={os.path.join(args.out, name)}", *overrides])
        run = build_run(cfg, template, resume=resume, console=False)
        keys: list[list[str]] = []  # per batch
        original = run.stream.next_batch

        def recording_next():
            batch = original()
            keys.append(list(batch.keys))
            return batch

        run.stream.next_batch = recording_next
        start = run.trainer.step
        summary = run.train(max_steps=stop)
        run.close()
        return {"start": start, "losses": [h["loss"] for h in summary.history], "keys": keys,
                "target_std": [h["target_std"] for h in summary.history], "checkpoint": summary.checkpoint,
                "counters": run.stream.counters(), "rank": run.rank, "world_size": run.world_size,
                "steps_per_epoch": run.stream.loader.steps_per_epoch}

    audio = data["audio"]
    # The resumed runs stop one step past a save and a validation (mid-epoch): the resumed half
    # must repeat the uninterrupted run's dropout draws and batches exactly from there, for
    # --resumed-steps steps (the position, the RNG and the optimizer state are all in play by then).
    every = [f"train.save_every={half}", f"train.val_every={half}"]
    results["full"] = scenario("full", "audio_tiny", audio, every)
    results["first_half"] = scenario("resumed", "audio_tiny", audio, every, stop=half + 3)
    results["second_half"] = scenario("resumed", "audio_tiny", audio, every, resume="auto",
                                      stop=half + 3 + args.resumed_steps)
    results["corrupt"] = scenario("corrupt", "audio_tiny", data["audio_corrupt"], ["train.max_steps=30"])
    quarter = [f"train.save_every={args.steps // 4}", f"train.val_every={args.steps // 4}"]
    for modality, preset in (("image", "image_tiny"), ("text", "text_tiny")):
        results[modality] = scenario(modality, preset, data[modality], quarter)
        results[f"{modality}_first"] = scenario(f"{modality}_resumed", preset, data[modality], quarter,
                                                stop=args.steps // 4 + 3)
        results[f"{modality}_second"] = scenario(f"{modality}_resumed", preset, data[modality], quarter,
                                                 resume="auto", stop=args.steps // 4 + 3 + args.resumed_steps)
    rank = results["full"]["rank"]
    from d2v.train.distributed import shm_buffer_path

    # DeepSpeed's CPU all-reduce workspace must not outlive the run under its /dev/shm name.
    results["shm_name_left"] = os.path.exists(shm_buffer_path(rank))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
    from d2v.train.distributed import shutdown

    shutdown()  # leave the process group together (see shutdown)
