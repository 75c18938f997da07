"""data2vec pretraining: the one entry point from a laptop CPU to a GPU cluster.

  deepspeed --num_gpus 8 launchers/pretrain.py --ds_config ds_configs/zero2.json --preset audio_base \
      --data 'shards/train-{000000..000511}.tar' --val-data 'shards/valid-{000000..000003}.tar' --out runs/ab

  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/pretrain.py --ds_config ds_configs/cpu.json \
      --preset audio_tiny --data 'demo_data/audio/shards/train-{000000..000007}.tar' train.max_steps=300

Ranks come from the deepspeed launcher (--local_rank plus environment), OpenMPI or Slurm
(environment only; see d2v.train.distributed). Positional `key=value` arguments override the
config (e.g. optim.lr=2e-4); `--config run.yaml` carries a file of differences.
"""
from __future__ import annotations

import argparse
import os
import sys



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ds_config", required=True, help="DeepSpeed JSON template (ds_configs/*.json)")
    ap.add_argument("--preset", default="audio_tiny",
                    help="preset name (python -m d2v describe lists sizes), or a `python -m d2v export` / "
                         "import-fairseq directory: its method continues (pair it with --init-from for its weights)")
    ap.add_argument("--config", default=None, help="YAML file of config differences")
    ap.add_argument("--data", default=None, help="brace-expanded training shard pattern (default: synthetic data)")
    ap.add_argument("--val-data", default=None, help="brace-expanded validation shard pattern")
    ap.add_argument("--out", default=None, help="run directory (logs, resolved config, checkpoints)")
    ap.add_argument("--resume", default="none", help="auto | none | a checkpoint tag (step_00001000)")
    ap.add_argument("--init-from", default=None,
                    help="start from pretrained weights: a transformers Data2Vec directory (export --format hf, "
                         "public data2vec weights) or a `python -m d2v export` directory; checked key by key")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s per device that the logged MFU is taken against (default: the GPU's bf16 "
                         "dense datasheet peak; a CPU has none)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from d2v.train.preemption import exit_on_signal_during_startup, release_build_locks_at_startup_exit, \
        watch_launcher

    exit_on_signal_during_startup()
    watch_launcher()
    release_build_locks_at_startup_exit()
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from d2v.config import load_template, resolve
    from d2v.train.launch import STARTUP_ERRORS, build_run, report_startup_error

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.train_shards={args.data}")
    if args.val_data:
        overrides.append(f"data.val_shards={args.val_data}")
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    if args.peak_tflops is not None:
        overrides.append(f"train.peak_tflops={args.peak_tflops}")
    from d2v.train.distributed import shutdown
    from d2v.train.loop import EXIT_NO_DATA, EXIT_NONFINITE, NoDataError, NonFiniteError
    from d2v.train.preemption import EXIT_PREEMPTED

    try:
        cfg = resolve(args.preset, args.config, overrides)
        run = build_run(cfg, load_template(args.ds_config), resume=args.resume, init_from=args.init_from)
    except STARTUP_ERRORS as err:  # every rank finds the same problem: each says it and leaves
        return report_startup_error(err)
    if run.rank == 0:  # what `python -m d2v plan` says for this run, from the same functions
        from d2v.plan import summary, table

        info = summary(run.cfg, run.batch_plan, run.trainer.ds_config)
        info["steps_per_epoch"] = getattr(getattr(run.stream, "loader", None), "steps_per_epoch", None)
        print(table(info), flush=True)
    try:
        summary = run.train()
    except NonFiniteError as e:  # every rank stops here together (the skip count is all-reduced)
        print(f"rank {run.rank}: {e}", file=sys.stderr)
        shutdown()
        return EXIT_NONFINITE
    except NoDataError as e:  # decided on the step's agreed flags: every rank stops here together
        print(f"rank {run.rank}: {e}", file=sys.stderr)
        shutdown()
        return EXIT_NO_DATA
    except OSError as e:  # the file system failed (a full disk while logging or saving): one line
        return report_startup_error(e)
    finally:
        run.close()
    shutdown()
    if summary.preempted:
        if run.rank == 0:
            print(f"preempted at step {summary.steps}: checkpoint {summary.checkpoint}; "
                  f"exit {EXIT_PREEMPTED} (resume with --resume auto)")
        return EXIT_PREEMPTED
    if run.rank == 0:
        first = f"{summary.first_loss:.4f}" if summary.first_loss is not None else "n/a"
        last = f"{summary.last_loss:.4f}" if summary.last_loss is not None else "n/a"
        print(f"done: {summary.steps} steps ({summary.skipped_steps} skipped); loss {first} -> {last}")
        print(f"logs: {os.path.join(summary.out_dir, 'metrics.jsonl')} and {os.path.join(summary.out_dir, 'tensorboard')}")
        print(f"checkpoints: {os.path.join(summary.out_dir, 'checkpoints')} (latest: {summary.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
