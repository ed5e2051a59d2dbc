#!/usr/bin/env python
"""Top-1 / top-5 of classifier checkpoints on an ImageFolder or WebDataset validation set, printed as a table.

  python launch/evaluate.py runs/finetune_vit-b_100e/best.safetensors --val /data/imagenet/val
  python launch/evaluate.py mae_finetuned_vit_base.pth mmpretrain_linear.pth --val /data/imagenet/val
  torchrun --nproc_per_node 8 launch/evaluate.py CKPT --val '/data/in1k-val-{000..063}.tar'
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mff_ds.eval.cli import evaluate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(evaluate_main(doc=__doc__))
