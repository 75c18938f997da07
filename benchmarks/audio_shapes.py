"""How many distinct batch shapes a speech run meets per epoch: every distinct (B, T) is a new
cuDNN attention graph (55-400 ms each on Hopper), a new Triton/torch.compile specialisation and a
shape the start-up planner never timed. Counted from the loader's own epoch plan (no data read)
over a LibriSpeech-960h-like length distribution (281,241 utterances, 12.3 s +- 3.5 s, 1-35 s).

    python benchmarks/audio_shapes.py [--preset audio_base] [--world-size 8] [--epochs 2]

Prints a table per rank-0 stream and writes a JSON record.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, table, write_record  # noqa: E402

UTTERANCES, MEAN_S, STD_S = 281_241, 12.3, 3.5


def librispeech_like_index(sample_rate: int = 16_000, per_shard: int = 1_000, seed: int = 0):
    from d2v.data.shards import ShardIndex

    lengths = (np.clip(np.random.default_rng(seed).normal(MEAN_S, STD_S, UTTERANCES), 1, 35)
               * sample_rate).astype(np.int64)
    cuts = range(0, len(lengths), per_shard)
    return ShardIndex(paths=[f"train-{i:06d}.tar" for i in range(len(cuts))],
                      keys=[[""] * len(lengths[c:c + per_shard]) for c in cuts],
                      lengths=[lengths[c:c + per_shard] for c in cuts])


def epoch_shapes(cfg, index, world_size: int, epoch: int, rank: int = 0) -> tuple[list[tuple[int, int]], float]:
    """(B, T frames) of every batch `rank` trains on in `epoch`, as the audio collate shapes them,
    and the share of the samples the reference's crop (to the shortest) would keep that are kept."""
    from d2v.data.audio import AudioLoaderOptions, batch_length
    from d2v.data.plan import train_plan
    from d2v.shapes import conv_output_length
    from d2v.train.shard_streams import PIPELINES

    options = AudioLoaderOptions.from_config(cfg)
    plan = train_plan(index, PIPELINES["audio"].batching(cfg), seed=cfg.train.seed, epoch=epoch,
                      world_size=world_size, workers=max(1, cfg.data.num_workers))
    shapes, kept, reference = [], 0, 0
    for w in range(max(1, cfg.data.num_workers)):
        for batch in plan.stream(rank, w):
            lengths = [min(int(index.lengths[s][i]), options.max_sample_size) for s, i in batch.items]
            samples = batch_length(lengths, pad=options.pad, max_sample_size=options.max_sample_size,
                                   length_multiple=options.length_multiple)
            shapes.append((len(lengths), conv_output_length(samples, options.conv_layers)))
            kept += len(lengths) * samples
            reference += len(lengths) * batch_length(lengths, pad=options.pad, max_sample_size=options.max_sample_size)
    return shapes, kept / max(reference, 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="audio_base")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from d2v.config import resolve
    from d2v.config.batch_plan import run_config

    cfg, _ = run_config(resolve(args.preset, overrides=args.overrides), args.world_size)
    index = librispeech_like_index(cfg.model.audio.sample_rate)
    rows, seen = [], set()
    for epoch in range(args.epochs):
        shapes, kept = epoch_shapes(cfg, index, args.world_size, epoch)
        new = set(shapes) - seen
        seen |= set(shapes)
        rows.append({"epoch": epoch, "batches": len(shapes), "distinct_BT": len(set(shapes)),
                     "distinct_T": len({t for _, t in shapes}), "new_BT": len(new),
                     "kept_vs_reference": kept})
    print(table(rows, [("epoch", "epoch", "{}"), ("batches", "batches (rank 0)", "{}"),
                       ("distinct_BT", "distinct (B, T)", "{}"), ("distinct_T", "distinct T", "{}"),
                       ("new_BT", "new (B, T) this epoch", "{}"),
                       ("kept_vs_reference", "audio kept vs the reference crop", "{:.3f}")]))
    path = write_record("audio_shapes", {"machine": machine(), "preset": args.preset,
                                         "world_size": args.world_size, "overrides": args.overrides,
                                         "pad": cfg.data.pad, "length_multiple": cfg.data.length_multiple,
                                         "rows": rows})
    print(f"record: {path}")


if __name__ == "__main__":
    main()
