"""Run by `deepspeed --num_gpus 2` from tests/test_glue.py: each rank scores its strided share of
the STS-B and MNLI dev sets of a GLUE tree with fixed logits, as FinetuneRun.evaluate does, and the
sums over ranks give the metrics.

Writes OUT/rank{r}.json: {task: metrics}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def fixed_logits(n: int, outputs: int):
    """The same B×V logits on every rank and in the test."""
    import torch

    return torch.randn(n, outputs, generator=torch.Generator().manual_seed(7))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--glue", required=True, help="glue_data folder")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = ap.parse_args()

    from d2v.finetune.model import TaskOutput
    from d2v.finetune.resolve import resolve_finetune
    from d2v.finetune.runner import _sum
    from d2v.finetune.tasks import build_task
    from d2v.train import distributed

    rank, world = distributed.init_distributed()
    report = {}
    for task, folder in (("sts_b", "STS-B"), ("mnli", "MNLI")):
        path = os.path.join(args.glue, folder)
        cfg, _ = resolve_finetune("glue", preset="text_tiny", recipe=f"glue_{task}", overrides=[
            f"finetune.train_data={path}", f"finetune.eval_data={path}", f"finetune.tokenizer={args.tokenizer}",
            f"model.text.vocab_size={args.vocab}"])
        t = build_task(cfg)
        logits = fixed_logits(t.size("eval"), t.num_outputs)
        mine = list(range(rank, t.size("eval"), world))
        sums = {k: 0.0 for k in t.score_keys}
        for start in range(0, len(mine), 5):
            batch = t.batch("eval", mine[start:start + 5])
            for k, v in t.score(TaskOutput(logits[batch.indices], None), batch).items():
                sums[k] += v
        report[task] = t.summarize(_sum(sums))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
