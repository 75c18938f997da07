#!/usr/bin/env python
"""fine-tuning of a pretrained encoder: the entry point `d2v.launchers.finetune` run from a checkout (its options: --help).

  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/finetune.py --ds_config ds_configs/cpu.json --task asr --init runs/demo-audio ...

The checkout's d2v comes first on the path, so a checkout runs without installing d2v; where d2v
is installed, `deepspeed --module d2v.launchers.finetune ...` runs the installed copy from any directory.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2v.launchers.finetune import main  # noqa: E402  (after the path)

if __name__ == "__main__":
    sys.exit(main())
