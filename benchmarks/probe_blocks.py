#!/usr/bin/env python
"""Which block of a pretrained encoder holds the k-NN features: the cross-validated k-NN top-1 (the probe of
`make eval-demo`, mff_ds.eval.probes.cv_probes over all 1,797 digits) of the cls token after every encoder block
and after the final norm (what the demo probes), for pretrainings on the digits demo.

  python benchmarks/probe_blocks.py runs/eval_demo           # every seed*/pretrain_{mff,mae} under it, final weights
  python benchmarks/probe_blocks.py RUN_DIR --checkpoints     # every kept checkpoint of one pretraining

A run dir is a pretraining's output dir (recipe.yaml, model_fp32.safetensors, checkpoints/). For a trajectory, keep
the checkpoints: `checkpoint.every_steps=55 checkpoint.keep_last=20` on the pretraining's command line.
docs/EVIDENCE.md ("MFF's seed-to-seed spread") reads its tables from this script.
"""
import argparse
import glob
import os
import statistics
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mff_ds.common import UserError, write_json  # noqa: E402


@torch.no_grad()
def block_features(model, images: torch.Tensor) -> list:
    """The unmasked encoder's cls token after each block, then after the final norm: depth + 1 tensors (N, C).
    The model's own forward_features runs; hooks on its blocks read their outputs."""
    out = []
    hooks = [blk.register_forward_hook(lambda m, i, o: out.append(o[:, 0])) for blk in model.blocks]
    try:
        final = model.forward_features(images)[:, 0]
    finally:
        for h in hooks:
            h.remove()
    return out + [final]


def run_dirs(paths: list) -> list:
    """Pretraining dirs: each path itself when it holds a recipe.yaml, else its seed*/pretrain_* dirs (eval_demo)."""
    found = []
    for p in paths:
        if os.path.isfile(os.path.join(p, "recipe.yaml")):
            found.append(p)
            continue
        kids = glob.glob(os.path.join(p, "seed*", "pretrain_*", "recipe.yaml"))
        if not kids:
            raise UserError(f"{p}: expected a pretraining dir (recipe.yaml) or an eval_demo output dir "
                            f"(seed*/pretrain_*/recipe.yaml), got neither")
        found += sorted((os.path.dirname(k) for k in kids), key=lambda d: (int(d.split("seed")[-1].split("/")[0]), d))
    return found


def weights(run: str, checkpoints: bool) -> list:
    """[(label, state dict)]: the final weights, or every complete checkpoint (safe loading, oldest first)."""
    from mff_ds.convert import read_file
    from mff_ds.engine.checkpoint import complete_tags
    from mff_ds.engine.safe_load import weights_only_loads
    if not checkpoints:
        return [("final", read_file(os.path.join(run, "model_fp32.safetensors"))[0])]
    root = os.path.join(run, "checkpoints")
    tags = complete_tags(root)
    if not tags:
        raise UserError(f"{root}: expected complete checkpoints, got none")
    with weights_only_loads():
        return [(f"step {step}", torch.load(os.path.join(root, tag, "mp_rank_00_model_states.pt"),
                                            map_location="cpu")["module"]) for step, tag in tags]


def probe_run(run: str, images, labels, checkpoints: bool, folds: int = 5) -> dict:
    """{label: [top-1 after block 1 .. depth, after the final norm]} of one pretraining."""
    from mff_ds.eval.probes import cv_probes
    from mff_ds.models import build_model
    with open(os.path.join(run, "recipe.yaml")) as f:
        model = build_model(yaml.safe_load(f)["model"]).eval()
    out = {}
    for label, sd in weights(run, checkpoints):
        model.load_state_dict(sd)
        out[label] = [cv_probes(f, labels, ("knn",), folds)["knn"] for f in block_features(model, images)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="pretraining dirs or eval_demo output dirs")
    ap.add_argument("--checkpoints", action="store_true", help="probe every kept checkpoint, not the final weights")
    ap.add_argument("--folds", type=int, default=5, help="k-fold cross-validation over all digits (as eval_demo)")
    ap.add_argument("--json", help="also write the numbers here")
    a = ap.parse_args(argv)
    from mff_ds.eval.probes import load_images
    from mff_ds.eval.recipe import EvalData
    try:
        runs = run_dirs(a.runs)
        with open(os.path.join(runs[0], "recipe.yaml")) as f:
            img_size = yaml.safe_load(f)["model"]["img_size"]
        (tx, ty), (vx, vy) = load_images(EvalData(source="digits", num_workers=0), img_size)
        images, labels = torch.cat([tx, vx]), torch.cat([ty, vy])
        res = {}
        for run in runs:
            res[run] = probe_run(run, images, labels, a.checkpoints, a.folds)
            for label, row in res[run].items():
                print(f"{run} {label}: " + " ".join(f"{v:5.1f}" for v in row), flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kinds = {}
    for run, rows in res.items():
        if "final" in rows:
            kinds.setdefault(os.path.basename(run), []).append(rows["final"])
    for kind, rows in kinds.items():
        if len(rows) > 1:
            cols = list(zip(*rows))
            print(f"{kind}, {len(rows)} runs, mean (sd) per block, then after the final norm: " +
                  " ".join(f"{statistics.mean(c):5.1f} ({statistics.stdev(c):.2f})" for c in cols))
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
