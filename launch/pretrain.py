#!/usr/bin/env python
"""MFF / MAE pretraining on DeepSpeed.

  python launch/pretrain.py                                  # configs/demo.yaml on this machine
  torchrun --nproc_per_node 8 launch/pretrain.py --config configs/mff_vit-b_300e.yaml
  deepspeed --hostfile hostfile launch/pretrain.py --config configs/mff_vit-b_300e.yaml
  srun launch/pretrain.py --config ...                       # rank/world/master from SLURM_*
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mff_ds.engine import signals  # noqa: E402

if __name__ == "__main__":
    signals.catch()  # before torch is imported: SIGUSR1/SIGTERM/SIGINT during start-up save at the first check

from mff_ds.engine.recipe import REPO_ROOT, RecipeError, load_recipe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "demo.yaml"), help="recipe YAML")
    p.add_argument("--output-dir", default=None, help="default: runs/<recipe name>")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set batch.micro_batch=256 (repeatable)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this optimizer step (schedule unchanged)")
    p.add_argument("--resume", default="auto", help="auto (latest complete checkpoint in the output dir), none (refused over another run's outputs), "
                   "fresh (move those aside to OUTPUT_DIR/previous-<time>/, then none), or a checkpoint PATH")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_steps is not None and args.max_steps < 1:
        print(f"error: --max-steps: expected a positive integer, got {args.max_steps}", file=sys.stderr)
        return 2
    from mff_ds.data import BadDataError
    from mff_ds.engine.checkpoint import CheckpointError
    from mff_ds.engine.rundir import RunDirError
    from mff_ds.engine.trainer import IncompatibleCheckpointError, NonFiniteLossError, train
    out = args.output_dir or os.path.join("runs", recipe.name)
    import torch.distributed as dist
    try:
        summary = train(recipe, out, max_steps=args.max_steps, resume=args.resume)
    except (RecipeError, IncompatibleCheckpointError, CheckpointError, RunDirError, NonFiniteLossError, BadDataError,
            FileNotFoundError, ValueError) as e:  # bad input or state: one line (ValueError: data / model settings)
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, NonFiniteLossError) else 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary.get("stopped_by"):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"stopped by {summary['stopped_by']} at step {summary['step']}/{summary['total_steps']}; checkpoint "
                  f"saved under {out}/checkpoints; rerun with --resume auto to continue", flush=True)
        return signals.exit_code(summary["stopped_by"])
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {summary['step']}/{summary['total_steps']}, loss {summary['first_loss']} -> "
              f"{summary['last_loss']}, outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
