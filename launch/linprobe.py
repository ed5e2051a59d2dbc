#!/usr/bin/env python
"""Linear probe of a frozen pretrained encoder (cls token + final norm, BatchNorm, LARS) on DeepSpeed.

  python launch/linprobe.py --config configs/linprobe_demo.yaml                       # the digits demo on this machine
  torchrun --nproc_per_node 8 launch/linprobe.py --checkpoint PATH [--checkpoint-format auto|mff_ds|mmpretrain|mae] \
      --set data.train_path=/data/imagenet/train --set data.val_path=/data/imagenet/val
  deepspeed / srun launch/linprobe.py ...                                          # as launch/pretrain.py

Writes metrics.jsonl (train loss, per-epoch top-1/top-5), checkpoints/ (resumable), best.safetensors, results.json.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mff_ds.eval.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main("linprobe", doc=__doc__))
