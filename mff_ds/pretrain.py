"""MFF / MAE pretraining on DeepSpeed: the command line of `python -m mff_ds.pretrain` and launch/pretrain.py.

  python -m mff_ds.pretrain                                  # the shipped demo recipe on this machine
  python -m mff_ds.pretrain --config mff_vit-b_300e          # a shipped recipe by name, or any YAML path
  torchrun --nproc_per_node 8 -m mff_ds.pretrain --config configs/mff_vit-b_300e.yaml
  deepspeed --hostfile hostfile launch/pretrain.py --config configs/mff_vit-b_300e.yaml
  srun launch/pretrain.py --config ...                       # rank/world/master from SLURM_*
"""
import os
import sys

from mff_ds.engine import signals

if __name__ == "__main__":
    signals.catch()  # before torch is imported: SIGUSR1/SIGTERM/SIGINT during start-up save at the first check

from mff_ds.engine.cli import load_or_report, run_or_report, run_parser  # noqa: E402
from mff_ds.engine.recipe import load_recipe  # noqa: E402


def main(argv=None, doc=__doc__) -> int:
    args = run_parser(doc, "demo", "batch.micro_batch=256").parse_args(argv)
    recipe = load_or_report(load_recipe, args, args.overrides)
    if recipe is None:
        return 2
    from mff_ds.engine.trainer import train
    out = args.output_dir or os.path.join("runs", recipe.name)
    import torch.distributed as dist
    try:
        summary, code = run_or_report(lambda: train(recipe, out, max_steps=args.max_steps, resume=args.resume))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary is None:
        return code
    if summary.get("stopped_by"):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"stopped by {summary['stopped_by']} at step {summary['step']}/{summary['total_steps']}; checkpoint "
                  f"saved under {out}/checkpoints; rerun with --resume auto to continue", flush=True)
        return signals.exit_code(summary["stopped_by"])
    if int(os.environ.get("RANK", "0")) == 0 and summary["first_loss"] is None:  # resumed at its last step
        print(f"nothing to do: the run in {out} is already at step {summary['step']}/{summary['total_steps']} "
              f"(--resume fresh starts it again, after moving these outputs aside)")
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {summary['step']}/{summary['total_steps']}, loss {summary['first_loss']} -> "
              f"{summary['last_loss']}, outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
