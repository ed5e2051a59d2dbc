"""Low-variance probes on frozen, extracted features: weighted k-NN and logistic regression.

The reference linear probe (LARS, random crops, a few epochs on a small set) moves by several points from one
seed to the next, which hides differences between encoders at small scale. These probes see each image once,
without augmentation, through the frozen encoder, and are deterministic for a given encoder:
- k-NN: cosine similarity to the training features, the k nearest vote with weight exp(sim / T)
  (k 20, T 0.07 as in DINO's and the MAE studies' k-NN evaluation);
- logistic regression: scikit-learn's multinomial L-BFGS on standardised features (a convex problem solved
  to convergence, so no lr, epochs or seed to tune).
Features: the cls token after the encoder's final norm (as the linear probe) or the mean of the patch tokens.
"""
import os
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mff_ds.common import UserError

PROBES = ("knn", "logreg")
POOLS = ("cls", "avg")


@torch.no_grad()
def extract_features(encoder, loader: Iterable, device=torch.device("cpu"), pool: str = "cls"
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float32 features and (N,) labels of every batch of `loader` through a timm ViT in eval mode."""
    if pool not in POOLS:
        raise UserError(f"pool: expected one of {', '.join(POOLS)}, got {pool!r}")
    encoder.eval().to(device)
    feats, labels = [], []
    for batch in loader:
        if batch is None:  # a batch of unreadable images (eval.data leaves them out)
            continue
        images, target = batch
        x = encoder.forward_features(images.to(device))          # (B, 1 + L, C) after the final norm
        feats.append((x[:, 0] if pool == "cls" else x[:, encoder.num_prefix_tokens:].mean(1)).float().cpu())
        labels.append(target.cpu())
    if not feats:
        raise UserError("extract_features: expected at least one readable image, got none")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 (percent) of the weighted cosine k-NN classifier (DINO's eval_knn)."""
    if k < 1:
        raise UserError(f"k: expected a positive integer, got {k}")
    k = min(k, len(train_x))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    tr = F.normalize(train_x.float(), dim=1)  # float32: ImageNet-size feature banks fit in memory
    correct = 0
    for i in range(0, len(test_x), chunk):
        sim = F.normalize(test_x[i:i + chunk].float(), dim=1) @ tr.T      # (b, N) cosine similarities
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_y[idx].long(), (top.double() / temperature).exp())
        correct += int((votes.argmax(1) == test_y[i:i + chunk]).sum())
    return 100.0 * correct / len(test_x)


def logreg_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                C: float = 1.0, max_iter: int = 2000) -> float:
    """Top-1 (percent) of a multinomial logistic regression on standardised features (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    # one BLAS thread: on these small matrices the threads' hand-offs cost more than the arithmetic (10x on 2 cores)
    with threadpool_limits(1):
        clf.fit(train_x.double().numpy(), train_y.numpy())
        return 100.0 * float(np.mean(clf.predict(test_x.double().numpy()) == test_y.numpy()))


def check_probes(probes: Sequence[str]) -> None:
    bad = [p for p in probes if p not in PROBES]
    if bad or not probes:
        raise UserError(f"probe: expected some of {', '.join(PROBES)}, got {', '.join(bad) or 'none'}")


def run_probes(train: Tuple[torch.Tensor, torch.Tensor], val: Tuple[torch.Tensor, torch.Tensor],
               probes: Sequence[str] = PROBES, k: int = 20, temperature: float = 0.07, C: float = 1.0
               ) -> Dict[str, float]:
    """{probe name: top-1} for the requested probes on extracted (features, labels) pairs."""
    check_probes(probes)
    out = {}
    if "knn" in probes:
        out["knn"] = knn_top1(*train, *val, k=k, temperature=temperature)
    if "logreg" in probes:
        out["logreg"] = logreg_top1(*train, *val, C=C)
    return out


def cv_probes(x: torch.Tensor, y: torch.Tensor, probes: Sequence[str] = PROBES, folds: int = 5,
              k: int = 20, temperature: float = 0.07, C: float = 1.0) -> Dict[str, float]:
    """{probe: top-1} by stratified k-fold cross-validation over all of (x, y): every sample is scored once, by a
    probe fitted on the other folds, and the top-1 is over all samples. Compared with one train/val split, the
    score rests on k times more test samples, so one seed's number moves less. The folds are fixed (not drawn
    from a seed), so every encoder and every seed is scored on the same ones and differences stay paired."""
    from sklearn.model_selection import StratifiedKFold
    check_probes(probes)
    counts = torch.bincount(y.long())
    fewest = int(counts[counts > 0].min())
    if not isinstance(folds, int) or folds < 2 or folds > fewest:
        raise UserError(f"folds: expected an integer from 2 to {fewest} (the smallest class's size), got {folds!r}")
    correct = dict.fromkeys(probes, 0.0)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=0).split(x.numpy(), y.numpy()):
        tr, te = torch.from_numpy(tr), torch.from_numpy(te)
        scores = run_probes((x[tr], y[tr]), (x[te], y[te]), probes, k=k, temperature=temperature, C=C)
        for name, top1 in scores.items():
            correct[name] += top1 * len(te) / 100.0
    return {name: 100.0 * c / len(y) for name, c in correct.items()}


def load_images(data, img_size: int, batch: int = 256) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
    """((train images, labels), (val images, labels)) of data (EvalData: an ImageFolder, shards or the digits demo)
    as normalised tensors after the validation transform (resize + center crop), decoded once so that several
    encoders can be probed on them."""
    from . import data as edata
    from .recipe import AugConfig
    tf = edata.val_transform(img_size, AugConfig(val_crop_pct=1.0))
    out = []
    for split in ("train", "val"):
        source = edata.open_source(data, split)
        loader, _ = edata.source_loader(data, source, tf, batch=batch, rank=0, world=1)
        parts = [b for b in loader if b is not None]
        if not parts:
            raise UserError(f"{source}: expected readable images, got none")
        out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return tuple(out)


def build_encoder(checkpoint: Optional[str], fmt: str = "auto", model: Optional[dict] = None,
                  img_size: Optional[int] = None, seed: int = 0):
    """The frozen timm ViT of `checkpoint` (any format load_encoder reads; None = a random encoder built from
    `model`, initialised under `seed`)."""
    from mff_ds.common import seed_everything

    from . import models as emodels
    seed_everything(seed)
    sd, cfg = emodels.load_encoder(checkpoint, fmt, model)
    return emodels.build_linprobe_model(sd, cfg, 2, img_size=img_size or cfg.img_size).encoder


def probe_images(encoder, images, probes: Sequence[str] = PROBES, pool: str = "cls", k: int = 20,
                 temperature: float = 0.07, C: float = 1.0, batch: int = 256, device=torch.device("cpu"),
                 folds: int = 0) -> Dict[str, float]:
    """Probes of `encoder` on load_images' output: fitted on train and scored on val, or with `folds` >= 2
    cross-validated over train and val together (cv_probes)."""
    check_probes(probes)
    feats = [extract_features(encoder, [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)],
                              device, pool) for x, y in images]
    if folds:
        x, y = (torch.cat(parts) for parts in zip(*feats))
        return cv_probes(x, y, probes, folds, k=k, temperature=temperature, C=C)
    return run_probes(feats[0], feats[1], probes, k=k, temperature=temperature, C=C)


def probe_encoder(checkpoint: Optional[str], data, *, fmt: str = "auto", model: Optional[dict] = None,
                  img_size: Optional[int] = None, seed: int = 0, batch: int = 256, device=torch.device("cpu"),
                  **probe_kw) -> Dict[str, float]:
    """Probes (probe_images' keywords) of one encoder on data's train and val sets."""
    check_probes(probe_kw.get("probes", PROBES))
    encoder = build_encoder(checkpoint, fmt, model, img_size, seed)
    images = load_images(data, encoder.patch_embed.img_size[0], batch)
    return probe_images(encoder, images, batch=batch, device=device, **probe_kw)


def probe_main(recipe, probes: Sequence[str], output_dir: str, pool: str = "cls") -> dict:
    """launch/linprobe.py --probe knn,logreg: the recipe's encoder and data, probes instead of the LARS head;
    writes OUTPUT_DIR/probes.json (atomic) and returns it."""
    from mff_ds.engine.distributed import device_for, init_distributed

    from mff_ds.common import write_json
    env = init_distributed(recipe.distributed.timeout_s, output_dir, recipe.distributed.peer_timeout_s)
    res = probe_encoder(recipe.init.checkpoint, recipe.data, fmt=recipe.init.format, model=recipe.model,
                        img_size=recipe.data.img_size, probes=probes, pool=pool, seed=recipe.seed,
                        batch=recipe.eval_batch, device=device_for(env.local_rank))
    out = {"checkpoint": recipe.init.checkpoint, "pool": pool, "top1": res}
    if env.rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        write_json(os.path.join(output_dir, "probes.json"), out)
    return out
