#!/usr/bin/env python
"""data2vec pretraining: the entry point `d2v.launchers.pretrain` run from a checkout (its options: --help).

  deepspeed --num_gpus 8 launchers/pretrain.py --ds_config ds_configs/zero2.json --preset audio_base --data 'shards/train-{000000..000511}.tar'

The checkout's d2v comes first on the path, so a checkout runs without installing d2v; where d2v
is installed, `deepspeed --module d2v.launchers.pretrain ...` runs the installed copy from any directory.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2v.launchers.pretrain import main  # noqa: E402  (after the path)

if __name__ == "__main__":
    sys.exit(main())
