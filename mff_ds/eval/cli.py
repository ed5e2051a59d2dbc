"""Command lines of `mff-ds finetune | linprobe | evaluate` (also `python -m mff_ds ...` and launch/*.py)."""
import argparse
import os
import sys

from mff_ds import zoo
from mff_ds.common import UserError
from mff_ds.engine import liveness
from mff_ds.engine.cli import load_or_report, print_schema, run_or_report, run_parser, stopped
from mff_ds.engine.recipe import RecipeError

DEFAULT_CONFIGS = {"finetune": "finetune_vit-b_100e", "linprobe": "linprobe_vit-b_90e"}  # shipped recipes
_LAUNCH = """
  torchrun --nproc_per_node 8 -m mff_ds {task} --checkpoint PATH [--checkpoint-format auto|mff_ds|mmpretrain|mae] \\
      --set data.train_path=/data/imagenet/train --set data.val_path=/data/imagenet/val
  deepspeed / srun launch/{task}.py ...     (in a checkout: the same command as a script, for launchers that take one)

Writes metrics.jsonl (train loss, per-epoch top-1/top-5), checkpoints/ (resumable), best.safetensors, results.json.
"""
DOCS = {
    "finetune": "Fine-tune a pretrained encoder (global-pool ViT, layer decay, Mixup/CutMix, RandAugment) on "
                "DeepSpeed.\n\n  mff-ds finetune --config finetune_demo --checkpoint runs/demo/model_fp32.safetensors"
                "   # the digits demo here" + _LAUNCH.format(task="finetune"),
    "linprobe": "Linear probe of a frozen pretrained encoder (cls token + final norm, BatchNorm, LARS) on DeepSpeed."
                "\n\n  mff-ds linprobe --config linprobe_demo --checkpoint runs/demo/model_fp32.safetensors"
                "   # the digits demo here" + _LAUNCH.format(task="linprobe"),
    "evaluate": """Top-1 / top-5 of classifier checkpoints on an ImageFolder or WebDataset validation set, as a table.

  mff-ds evaluate runs/finetune_vit-b_100e/best.safetensors --val /data/imagenet/val
  mff-ds evaluate mae_finetuned_vit_base.pth mmpretrain_linear.pth --val /data/imagenet/val
  torchrun --nproc_per_node 8 -m mff_ds evaluate CKPT --val '/data/in1k-val-{000..063}.tar'
""",
}


def train_main(task: str, argv=None, doc: str = None) -> int:
    p = run_parser(doc or DOCS[task], DEFAULT_CONFIGS[task], "data.train_path=/data/in1k/train")
    p.add_argument("--checkpoint", default=None, help="pretrained weights: a file or a zoo name (python -m "
                   "mff_ds.zoo list); sets init.checkpoint")
    p.add_argument("--checkpoint-format", default=None, choices=["auto", "mff_ds", "mmpretrain", "mae"],
                   help="sets init.format (default from the recipe: auto)")
    if task == "linprobe":
        p.add_argument("--probe", default="lars", help="lars (the reference: train a BatchNorm + Linear head), or "
                       "knn and/or logreg (comma-separated): deterministic probes on frozen extracted features, "
                       "written to OUTPUT_DIR/probes.json (mff_ds/eval/probes.py)")
        p.add_argument("--pool", default="cls", choices=["cls", "avg"], help="features of --probe knn/logreg: the "
                       "cls token or the mean patch token, after the final norm")
    a = p.parse_args(argv)
    from .recipe import EvalRecipe, load_eval_recipe
    if a.print_schema:
        return print_schema(EvalRecipe)
    overrides = list(a.overrides)
    if a.checkpoint is not None:
        overrides.append(f"init.checkpoint={zoo.as_given(a.checkpoint)}")
    if a.checkpoint_format is not None:
        overrides.append(f"init.format={a.checkpoint_format}")

    def load(config, overrides):
        recipe = load_eval_recipe(config, overrides)
        if recipe.task != task:
            raise RecipeError([f"task: launch/{task}.py runs task {task!r}, the recipe says {recipe.task!r}"], config)
        return recipe
    recipe = load_or_report(load, a, overrides)
    if recipe is None:
        return 2
    from .train import run
    out = a.output_dir or os.path.join("runs", recipe.name)
    if getattr(a, "probe", "lars") != "lars":
        return _feature_probes(recipe, a.probe, a.pool, out)
    s, code = run_or_report(lambda: run(recipe, out, max_steps=a.max_steps, resume=a.resume))
    if s is None:
        return code
    code = stopped(s, out)
    if code is not None:
        return code
    if int(os.environ.get("RANK", "0")) == 0 and s["best_top1"] is not None:
        print(f"done: step {s['step']}/{s['total_steps']}; best top-1 {s['best_top1']:.2f} top-5 {s['best_top5']:.2f} "
              f"(epoch {s['best_epoch']}), last top-1 {s['last_top1']:.2f}; best classifier {s['best_path']}; "
              f"metrics in {out}/metrics.jsonl")
    return 0


def _feature_probes(recipe, probe: str, pool: str, out: str) -> int:
    """The probes save nothing to resume: a stop signal (also one `mff-ds` kept during start-up) ends them at once."""
    from mff_ds.engine import signals
    names = [p.strip() for p in probe.split(",") if p.strip()]
    try:
        with signals.raising():
            from .probes import probe_main
            res = probe_main(recipe, names, out, pool)
    except signals.Stopped as e:
        print(f"stopped by {e.signal} during the {', '.join(names)} probe{'s' if len(names) > 1 else ''}: the "
              f"feature probes save nothing to resume; rerun the command", file=sys.stderr, flush=True)
        return e.exit_code
    except UserError as e:
        liveness.failed(f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print("done: " + ", ".join(f"{k} top-1 {v:.2f}" for k, v in res["top1"].items())
              + f" ({pool} features); results in {out}/probes.json")
    return 0


def evaluate_main(argv=None, doc: str = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=doc or DOCS["evaluate"],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="+", help="classifier file(s): best.safetensors from finetune/linprobe, an "
                                                 "mmpretrain / official MAE fine-tuned or linear-probe checkpoint, "
                                                 "or a zoo name (python -m mff_ds.zoo list)")
    p.add_argument("--val", required=True, help="validation ImageFolder root or WebDataset shard pattern")
    p.add_argument("--img-size", type=int, default=None, help="default: the classifier's")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--crop-pct", type=float, default=0.875, help="resize to size/crop_pct, center crop")
    p.add_argument("--interpolation", default="bicubic")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=None, help="external checkpoints: default embed_dim // 64")
    p.add_argument("--output-dir", default=None, help="append the results to OUTPUT_DIR/metrics.jsonl")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from .metrics import table
    from .train import evaluate_checkpoint
    rows = []
    for path in a.checkpoint:
        try:
            r = evaluate_checkpoint(path, a.val, img_size=a.img_size, batch=a.batch, crop_pct=a.crop_pct,
                                    interpolation=a.interpolation, num_workers=a.num_workers, num_heads=a.num_heads,
                                    output_dir=a.output_dir)
        except UserError as e:
            liveness.failed(f"error: {e}")
            print(f"error: {e}", file=sys.stderr)
            return 2
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) + "/" + os.path.basename(path)
        rows.append(dict(r, name=name if os.path.exists(path) else path))  # else a zoo name
    if int(os.environ.get("RANK", "0")) == 0:
        print(table(rows, ("name", "task", "top1", "top5", "val_samples")))
    return 0
