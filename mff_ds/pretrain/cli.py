"""The pretraining command line: `python -m mff_ds.pretrain` and launch/pretrain.py.

  python -m mff_ds.pretrain                                  # the shipped demo recipe on this machine
  python -m mff_ds.pretrain --config mff_vit-b_300e          # a shipped recipe by name, or any YAML path
  torchrun --nproc_per_node 8 -m mff_ds.pretrain --config configs/mff_vit-b_300e.yaml
  deepspeed --hostfile hostfile launch/pretrain.py --config configs/mff_vit-b_300e.yaml
  srun launch/pretrain.py --config ...                       # rank/world/master from SLURM_*
"""
import os

from mff_ds.engine.cli import load_or_report, print_schema, run_or_report, run_parser, stopped


def main(argv=None, doc=__doc__) -> int:
    args = run_parser(doc, "demo", "batch.micro_batch=256").parse_args(argv)
    from .recipe import Recipe, load_recipe  # after --help, which needs neither torch nor the models
    if args.print_schema:
        return print_schema(Recipe)
    recipe = load_or_report(load_recipe, args, args.overrides)
    if recipe is None:
        return 2
    out = args.output_dir or os.path.join("runs", recipe.name)
    import torch.distributed as dist
    try:
        from .task import train
        summary, code = run_or_report(lambda: train(recipe, out, max_steps=args.max_steps, resume=args.resume))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary is None:
        return code
    code = stopped(summary, out)
    if code is not None:
        return code
    if int(os.environ.get("RANK", "0")) == 0 and summary["first_loss"] is None:  # resumed at its last step
        print(f"nothing to do: the run in {out} is already at step {summary['step']}/{summary['total_steps']} "
              f"(--resume fresh starts it again, after moving these outputs aside)")
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {summary['step']}/{summary['total_steps']}, loss {summary['first_loss']} -> "
              f"{summary['last_loss']}, outputs in {out}")
    return 0
