"""Data pipeline throughput: ours (build_loader) vs a plain torchvision ImageFolder + transforms pipeline, and
the device-decoding path (`data.decode: gpu`) vs the CPU path on every core.

    python benchmarks/data_throughput.py --json benchmarks/results/data_throughput.json [--images 512] [--workers 0]
    python benchmarks/data_throughput.py --device cuda --images 2000 [--gpu-workers 4] [--cpu-workers N]

Generates --images ImageNet-like JPEGs (about 500x375, quality 90, cut from the photographs bundled with
scikit-image) and runs both pipelines over the same files in the same process, alternating, for the MAE
augmentation (RandomResizedCrop 0.2-1 bicubic + flip) and the MFF one (Resize + RandomCrop pad 4 + flip).
Baseline = what the official MAE code does: torchvision ImageFolder (PIL decode) -> transforms -> ToTensor ->
Normalize -> float batches. Ours -> uint8 batches (normalisation runs later on the GPU).
Reported: images/s per worker process (= total / max(workers, 1); workers=0 runs in this process), the median
of --repeats passes each, one thread per process (as DataLoader workers run).

--device cuda (or cpu, to smoke-test the code): the MFF (and --augs) pipeline as the trainer consumes it, batches
moved to the device and normalised there, in total images/s (median of --repeats passes after a warm-up pass,
persistent workers): `decode: gpu` with --gpu-workers workers (batch --device-batch: nvJPEG decodes a whole batch
at once) against `decode: cpu` with --cpu-workers (default: every core of the machine; batch --batch, so every
worker has several batches per pass). "cores" = CPU time of this process and its workers / wall time.
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
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mff_ds.common import write_json  # noqa: E402
from mff_ds.data import DataConfig, build_loader, make_augment, normalize  # noqa: E402
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
    # the PIL pipeline our augmentation reproduces (mae: facebookresearch/mae main_pretrain.py; mff: the mmpretrain
    # config's, in torchvision transforms)
    norm = [T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]
    ds = datasets.ImageFolder(root, transform=T.Compose([make_augment(aug, size).torchvision()] + norm))
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


def cpu_seconds():
    """CPU time of this process and its live children (the persistent DataLoader workers)."""
    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a child that just ended
            pass
    return total


def device_pass(loader, device):
    """One epoch as the trainer consumes it -> (images/s, CPU cores busy)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    c, t, n = cpu_seconds(), time.perf_counter(), 0
    for images, _ in loader:
        normalize(images.to(device, non_blocking=True), dtype=torch.bfloat16)
        n += images.shape[0]
    sync()
    wall = time.perf_counter() - t
    return n / wall, (cpu_seconds() - c) / wall


def measure_device(root, aug, a, device):
    """decode: gpu with a.gpu_workers vs decode: cpu with a.cpu_workers, on the same files."""
    out = {}
    for name, decode, workers, batch in (("gpu_path", "gpu", a.gpu_workers, a.device_batch),
                                         ("cpu_path", "cpu", a.cpu_workers, a.batch)):
        cfg = DataConfig(source="imagefolder", path=root, augment=aug, num_workers=workers, decode=decode,
                         pin_memory=device.type == "cuda")
        loader = build_loader(cfg, img_size=a.img_size, micro_batch=batch, rank=0, world_size=1, seed=0, epoch=0,
                              device=device if decode == "gpu" else None)
        device_pass(loader, device)  # warm-up: workers, page cache, nvJPEG and kernel initialisation
        runs = []
        for r in range(a.repeats):
            loader.set_epoch(r + 1)
            runs.append(device_pass(loader, device))
        k = sorted(range(len(runs)), key=lambda i: runs[i][0])[len(runs) // 2]  # the median pass
        out[name] = {"img_s": round(runs[k][0], 1), "cores": round(runs[k][1], 2), "workers": workers,
                     "batch": batch, "runs": [round(x, 1) for x, _ in runs]}
        del loader
    out["gpu_over_cpu"] = round(out["gpu_path"]["img_s"] / out["cpu_path"]["img_s"], 2)
    return out


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write results here (atomically)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for both pipelines (0: in-process)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", help="reuse/generate the JPEGs here instead of a temporary directory")
    ap.add_argument("--device", help="cuda (or cpu): compare decode: gpu on this device with the CPU path")
    ap.add_argument("--gpu-workers", type=int, default=4, help="--device: workers of the device path")
    ap.add_argument("--cpu-workers", type=int, default=os.cpu_count(), help="--device: workers of the CPU path")
    ap.add_argument("--device-batch", type=int, default=256, help="--device: batch of the device path")
    ap.add_argument("--augs", default="mff", help="--device: comma-separated augmentations (mff, mae)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.device:
        return main_device(a)

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
        write_json(a.json, res, indent=1)
    print(json.dumps({k: res[k] for k in ("ours_img_s", "torchvision_img_s", "ratio")}))


def main_device(a):
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu to smoke-test")
    with tempfile.TemporaryDirectory() as tmp:
        root = a.data_dir or os.path.join(tmp, "jpegs")
        if not os.path.isdir(root):
            t = time.perf_counter()
            make_images(root, a.images)
            print(f"generated {a.images} JPEGs in {time.perf_counter() - t:.1f}s", flush=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        res = {"images": a.images, "img_size": a.img_size, "repeats": a.repeats, "device": name,
               "image_px": "about 500x375 JPEG q90", "unit": "images/s, total",
               "host": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
               "command": "python " + " ".join(sys.argv)}
        for aug in a.augs.split(","):
            res[aug] = r = measure_device(root, aug, a, device)
            g, c = r["gpu_path"], r["cpu_path"]
            print(f"{aug}: decode gpu {g['img_s']} img/s ({g['workers']} workers, {g['cores']} cores busy) | "
                  f"decode cpu {c['img_s']} img/s ({c['workers']} workers, {c['cores']} cores busy) | "
                  f"{r['gpu_over_cpu']}x", flush=True)
    if a.json:
        write_json(a.json, res, indent=1)
    return res


if __name__ == "__main__":
    main()
