#!/usr/bin/env python
"""The whole downstream loop on CPU with bundled real data (`make eval-demo`, a few minutes on 2 cores):

  1. pretrain a tiny MFF and a tiny plain MAE (same model, data and schedule; only the fusion differs) on
     scikit-learn's digits upscaled to 32 px (configs/pretrain_digits_demo.yaml, the pretraining trainer);
  2. linear-probe both and a randomly initialised encoder (configs/linprobe_demo.yaml: frozen encoder,
     cls token + final norm, BatchNorm, LARS) on the digits train split, evaluate on the val split;
  3. print the three top-1 / top-5 accuracies and the wall time.

  python launch/eval_demo.py [--output-dir runs/eval_demo] [--pretrain-epochs N] [--probe-epochs N]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join("runs", "eval_demo"))
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--probe-epochs", type=int, default=None, help="default: the recipe's")
    a = p.parse_args(argv)
    t0 = time.time()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores: one compute thread + one data worker
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from mff_ds.data.demo import digits_root
    from mff_ds.engine.recipe import load_recipe
    from mff_ds.engine.trainer import train
    from mff_ds.eval.metrics import table
    from mff_ds.eval.recipe import load_eval_recipe
    from mff_ds.eval.train import run

    train_root = str(digits_root("train"))
    extra = [f"schedule.epochs={a.pretrain_epochs}", f"schedule.warmup_epochs={a.pretrain_epochs / 10}"] \
        if a.pretrain_epochs else []
    encoders, rows = {}, []
    for name, levels in (("MFF", "[1, 3, 5]"), ("MAE", "[5]")):
        recipe = load_recipe("configs/pretrain_digits_demo.yaml",
                             [f"name=pretrain_digits_{name.lower()}", f"data.path={train_root}",
                              f"model.out_indices={levels}"] + extra)
        out = os.path.join(a.output_dir, f"pretrain_{name.lower()}")
        t = time.time()
        s = train(recipe, out, resume="fresh")
        print(f"[{time.time() - t0:5.0f}s] pretrained {name}: {s['step']} steps, loss {s['first_loss']:.3f} -> "
              f"{s['last_loss']:.3f} ({time.time() - t:.0f}s)", flush=True)
        encoders[name] = (os.path.join(out, "model_fp32.safetensors"), s["last_loss"])
    encoders["random init"] = (None, None)

    extra = [f"schedule.epochs={a.probe_epochs}", f"schedule.warmup_epochs={a.probe_epochs / 10}"] \
        if a.probe_epochs else []
    for name, (ckpt, loss) in encoders.items():
        overrides = [f"name=linprobe_{name.split()[0].lower()}"] + extra
        if ckpt:
            overrides.append(f"init.checkpoint={ckpt}")
        recipe = load_eval_recipe("configs/linprobe_demo.yaml", overrides)
        t = time.time()
        s = run(recipe, os.path.join(a.output_dir, recipe.name), resume="fresh", quiet=True)
        print(f"[{time.time() - t0:5.0f}s] linear probe of the {name} encoder: top-1 {s['last_top1']:.2f} "
              f"(best {s['best_top1']:.2f} @ epoch {s['best_epoch']}) ({time.time() - t:.0f}s)", flush=True)
        rows.append({"encoder": name, "pretrain loss": "-" if loss is None else f"{loss:.3f}",
                     "top1": s["last_top1"], "top5": s["last_top5"], "best top1": s["best_top1"]})
    print(f"\nLinear probe on digits (val split, {s['history'][-1]['val_samples']} images), last epoch:")
    print(table(rows, ("encoder", "pretrain loss", "top1", "top5", "best top1")))
    print(f"\nwall time {time.time() - t0:.0f}s; outputs in {a.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
