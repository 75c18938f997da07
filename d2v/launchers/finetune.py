"""Fine-tuning of a pretrained d2v encoder (README, fine-tuning): CTC speech recognition, image and text
classification, on the same config system and DeepSpeed launcher as pretraining.

  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/finetune.py --ds_config ds_configs/cpu.json \
      --task asr --init runs/demo-audio --train-data 'demo_data/asr/shards/train-{000000..000007}.tar' \
      --eval-data 'demo_data/asr/shards/val-{000000..000001}.tar' --out runs/ft-asr train.max_steps=300

  ... --task asr --recipe base_10h --train-data 'ft/train-{000000..000009}.tar' \
      --eval-data 'dev_clean=ft/dev_clean-{000000..000003}.tar;dev_other=ft/dev_other-{000000..000003}.tar' \
      finetune.decode.lm=4-gram.arpa    (Libri-light and LibriSpeech from `python -m d2v.data.prepare asr`)

  ... --task image_cls --train-data demo_data/digits/train --eval-data demo_data/digits/val
      [--recipe vision_base_v2: data2vec 2.0's ImageNet recipe; README, fine-tuning]
  ... --task text_cls --train-data demo_data/text_cls/train.tsv --eval-data demo_data/text_cls/test.tsv
  ... --task glue --recipe glue_rte --train-data glue_data/RTE --eval-data glue_data/RTE   (GLUE's TSV layout)

--init takes a d2v checkpoint (run dir, checkpoints dir or tag), an export directory (`python -m
d2v export`), or a transformers directory (`export --format hf`, or public data2vec weights on disk;
loaded with the key checks of `--init-from`); --random-init keeps its architecture but not its weights (the baseline); --preset
gives an architecture without any checkpoint. Positional `key=value` arguments override the config
(optim.lr=1e-4, train.max_steps=500, finetune.freeze_encoder_steps=50). Prints the evaluation as
JSON on the last line and writes OUT/finetune.json, OUT/metrics.jsonl and a DeepSpeed checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from d2v.finetune.recipes import RECIPES
    from d2v.finetune.tasks import TASKS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ds_config", required=True, help="DeepSpeed JSON template (ZeRO 0-2)")
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--init", default=None, help="d2v checkpoint, export directory or transformers directory to start from")
    ap.add_argument("--random-init", action="store_true", help="same architecture, random weights (baseline)")
    ap.add_argument("--preset", default=None, help="architecture for a random-init run without --init")
    ap.add_argument("--recipe", default=None,
                    help="a reference's settings by name (d2v.finetune.recipes: "
                         + ", ".join(f"{n} ({r.task})" for n, r in sorted(RECIPES.items()))
                         + "), applied before the key=value overrides")
    ap.add_argument("--train-data", default=None,
                    help="; ".join(f"{n}: {c.data_help}" for n, c in sorted(TASKS.items())))
    ap.add_argument("--eval-data", default=None, help="held-out data in the same form")
    ap.add_argument("--tokenizer", default=None, help="text_cls, glue: tokenizer file (default: the pretraining one)")
    ap.add_argument("--out", default=None, help="run directory (default runs/finetune-TASK)")
    ap.add_argument("--resume", default="none", help="auto | none | a checkpoint tag (step_00001000)")
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
    if args.preset and args.init:
        raise SystemExit("give --init or --preset, not both (--init --random-init is the baseline of a checkpoint)")
    from d2v.config import load_template
    from d2v.finetune.resolve import resolve_finetune
    from d2v.finetune.runner import FinetuneRun

    overrides = []
    for key, value in (("finetune.train_data", args.train_data), ("finetune.eval_data", args.eval_data),
                       ("finetune.tokenizer", args.tokenizer), ("finetune.recipe", args.recipe),
                       ("train.out_dir", args.out)):
        if value:
            overrides.append(f"{key}={value}")
    from d2v.train.launch import STARTUP_ERRORS, report_startup_error
    from d2v.train.loop import EXIT_NONFINITE, NonFiniteError
    from d2v.train.preemption import EXIT_PREEMPTED

    try:
        cfg, _ = resolve_finetune(args.task, init=args.init, preset=args.preset, recipe=args.recipe,
                                  overrides=overrides + args.overrides)
        run = FinetuneRun(cfg, load_template(args.ds_config), random_init=args.random_init or not args.init,
                          resume=args.resume)
    except STARTUP_ERRORS as err:
        return report_startup_error(err)
    try:
        result = run.train()
    except NonFiniteError as e:  # every rank stops here together (the decision is agreed)
        print(f"rank {run.rank}: {e}", file=sys.stderr)
        run.close()
        return EXIT_NONFINITE
    except OSError as e:  # the file system failed (a full disk while logging or saving): one line
        return report_startup_error(e)
    run.close()  # not on other errors: the launcher then stops the other ranks, a barrier would wait for them
    if result["preempted"]:
        if run.rank == 0:
            print(f"preempted at step {result['steps']}: checkpoint {result['checkpoint']}; "
                  f"exit {EXIT_PREEMPTED} (resume with --resume auto)")
        return EXIT_PREEMPTED
    if run.rank == 0:
        # No losses when a resumed run was already at train.max_steps: it only evaluates.
        first, last = (f"{v:.4f}" if v is not None else "n/a" for v in (result["first_loss"], result["last_loss"]))
        print(f"done: {result['steps']} steps; loss {first} -> {last}; eval {result['metrics']}; "
              f"checkpoint {result['checkpoint']}")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
