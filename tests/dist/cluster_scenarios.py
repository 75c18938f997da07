"""Run by `deepspeed --num_gpus 2` from tests/test_cluster_ops.py:
1. resume, on 2 ranks, a ZeRO-3 checkpoint written by 1 rank (1 -> 2), and dump the state;
2. train a 2-rank ZeRO-3 run and checkpoint it, dumping the state it saved (for 2 -> 1).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--from-one-rank", required=True)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from cluster_common import cluster_config, dump_state, zero3_template
    from d2v.train.launch import build_run

    # 1 -> 2: resume a world-size-1 checkpoint on two ranks.
    run = build_run(cluster_config(args.from_one_rank, 6), zero3_template(), resume="auto", console=False)
    state = dump_state(run.trainer)
    if run.rank == 0:
        torch.save(state, os.path.join(args.out, "resumed_on_two.pt"))
    run.close()

    # 2 -> 1: train on two ranks and checkpoint; dump what was saved.
    run = build_run(cluster_config(os.path.join(args.out, "two_ranks"), 6), zero3_template(), console=False)
    run.train()
    state = dump_state(run.trainer)
    if run.rank == 0:
        torch.save(state, os.path.join(args.out, "saved_on_two.pt"))
    run.close()
    with open(os.path.join(args.out, f"rank{run.rank}.json"), "w") as f:
        f.write("{}")


if __name__ == "__main__":
    main()
    from d2v.train.distributed import shutdown

    shutdown()  # leave the process group together (see shutdown)
