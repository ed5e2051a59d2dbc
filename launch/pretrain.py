#!/usr/bin/env python
"""MFF / MAE pretraining on DeepSpeed (a thin wrapper of `python -m mff_ds.pretrain`, for launchers given a script).

  python launch/pretrain.py                                  # configs/demo.yaml on this machine
  torchrun --nproc_per_node 8 launch/pretrain.py --config configs/mff_vit-b_300e.yaml
  deepspeed --hostfile hostfile launch/pretrain.py --config configs/mff_vit-b_300e.yaml
  srun launch/pretrain.py --config ...                       # rank/world/master from SLURM_*
  python launch/pretrain.py --config mff_vit-b_300e          # a shipped recipe by name
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mff_ds.engine import signals  # noqa: E402

if __name__ == "__main__":
    signals.catch()  # before torch is imported: SIGUSR1/SIGTERM/SIGINT during start-up save at the first check

from mff_ds.pretrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(doc=__doc__))
