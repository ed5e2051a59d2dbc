"""Data pipeline throughput: ours (build_loader) vs a plain torchvision ImageFolder + transforms pipeline.

    python benchmarks/data_throughput.py --json benchmarks/results/data_throughput.json [--images 512] [--workers 0]

Generates --images ImageNet-like JPEGs (about 500x375, quality 90, cut from the photographs bundled with
scikit-image) and runs both pipelines over the same files in the same process, alternating, for the MAE
augmentation (RandomResizedCrop 0.2-1 bicubic + flip) and the MFF one (Resize + RandomCrop pad 4 + flip).
Baseline = what the official MAE code does: torchvision ImageFolder (PIL decode) -> transforms -> ToTensor ->
Normalize -> float batches. Ours -> uint8 batches (normalisation runs later on the GPU).
Reported: images/s per worker process (= total / max(workers, 1); workers=0 runs in this process), the median
of --repeats passes each, one thread per process (as DataLoader workers run).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mff_ds.data import DataConfig, build_loader  # noqa: E402
from mff_ds.data.demo import photos  # noqa: E402


def make_images(root, n, seed=0):
    """n JPEGs of ImageNet-like sizes (500x375, 375x500, 500x333, ...) in 4 class folders."""
    rng = np.random.default_rng(seed)
    srcs = list(photos().values())
    sizes = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 500), (450, 338)]
    for i in range(n):
        im = srcs[i % len(srcs)]
        w, h = sizes[int(rng.integers(len(sizes)))]
        W, H = im.size
        s = min(W / w, H / h) * rng.uniform(0.6, 1.0)  # crop a region with the target's aspect, then resize
        cw, ch = w * s, h * s
        x, y = rng.uniform(0, W - cw), rng.uniform(0, H - ch)
        out = im.resize((w, h), Image.BICUBIC, box=(x, y, x + cw, y + ch))
        folder = os.path.join(root, f"class{i % 4}")
        os.makedirs(folder, exist_ok=True)
        out.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def torchvision_loader(root, aug, size, batch, workers):
    norm = [T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]
    if aug == "mae":  # facebookresearch/mae main_pretrain.py
        tf = [T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
              T.RandomHorizontalFlip()]
    else:  # the MFF reference pipeline (mmpretrain config, torchvision transforms)
        tf = [T.Resize(size), T.RandomCrop(size, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()]
    ds = datasets.ImageFolder(root, transform=T.Compose(tf + norm))
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0)


def ours_loader(root, aug, size, batch, workers, epoch):
    cfg = DataConfig(source="imagefolder", path=root, augment=aug, num_workers=workers, pin_memory=False)
    return build_loader(cfg, img_size=size, micro_batch=batch, rank=0, world_size=1, seed=0, epoch=epoch)


def timed_pass(loader):
    t, n = time.perf_counter(), 0
    for images, labels in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - t)


def measure(root, aug, a):
    per = max(a.workers, 1)
    tv = torchvision_loader(root, aug, a.img_size, a.batch, a.workers)
    timed_pass(tv)  # warm-up (page cache, workers)
    timed_pass(ours_loader(root, aug, a.img_size, a.batch, a.workers, epoch=100))
    ours_r, tv_r = [], []
    for r in range(a.repeats):
        ours_r.append(timed_pass(ours_loader(root, aug, a.img_size, a.batch, a.workers, epoch=r)) / per)
        tv_r.append(timed_pass(tv) / per)
    ours, base = statistics.median(ours_r), statistics.median(tv_r)
    return {"ours_img_s": round(ours, 1), "torchvision_img_s": round(base, 1), "ratio": round(ours / base, 2),
            "ours_runs": [round(x, 1) for x in ours_r], "torchvision_runs": [round(x, 1) for x in tv_r]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write results here (atomically)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for both pipelines (0: in-process)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", help="reuse/generate the JPEGs here instead of a temporary directory")
    a = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = a.data_dir or os.path.join(tmp, "jpegs")
        if not os.path.isdir(root):
            make_images(root, a.images)
        res = {"images": a.images, "workers": a.workers, "batch": a.batch, "img_size": a.img_size,
               "repeats": a.repeats, "image_px": "about 500x375 JPEG q90", "unit": "images/s per worker process",
               "host": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}"}
        for aug in ("mae", "mff"):
            res[aug] = measure(root, aug, a)
            print(f"{aug}: ours {res[aug]['ours_img_s']} img/s, torchvision {res[aug]['torchvision_img_s']} img/s,"
                  f" ratio {res[aug]['ratio']}", flush=True)
    res.update({k: res["mae"][k] for k in ("ours_img_s", "torchvision_img_s", "ratio")})
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        tmpf = f"{a.json}.tmp{os.getpid()}"
        with open(tmpf, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmpf, a.json)
    print(json.dumps({k: res[k] for k in ("ours_img_s", "torchvision_img_s", "ratio")}))


if __name__ == "__main__":
    main()
