"""Bundled demo data, built offline on first use (no download) under mff_ds.common.cache_dir().

demo_root():          ImageFolder of 400 JPEG crops (96-160 px sides) cut from the real photographs that ship
                      inside scikit-image (astronaut, coffee, chelsea, rocket, ...), one class per photograph.
digits_root(split):   labelled ImageFolder ("train" 1438 / "val" 359 images, classes 0-9) of scikit-learn's
                      bundled 8x8 digits, upscaled to 32x32 RGB PNGs, for the downstream-evaluation demo.
Each tree is built in a temporary directory and renamed into place, so a half-built tree is never used.
"""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mff_ds.common import UserError, cache_dir

# Photographs inside the scikit-image wheel (skimage/data/); the others in skimage.data are fetched by pooch.
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
          "ihc.png", "motorcycle_left.png", "camera.png", "coins.png")
CROPS_PER_PHOTO = 40
VERSION = "v1"


def _build_once(name, build):
    final = cache_dir() / name
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=final.parent))
    except OSError as e:
        raise UserError(f"{'MFF_DS_CACHE' if os.environ.get('MFF_DS_CACHE') else 'the cache folder'}: expected a "
                        f"folder this process can write, got {final.parent} ({e.strerror or e})") from None
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not "another process finished first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def photos():
    """The bundled photographs as RGB PIL images, {name: image}."""
    import skimage.data

    out = {}
    for f in PHOTOS:
        p = Path(skimage.data.data_dir) / f
        if not p.exists():
            raise FileNotFoundError(f"scikit-image sample photograph {p} is missing; reinstall scikit-image")
        with Image.open(p) as im:
            out[Path(f).stem] = im.convert("RGB")
    return out


def _build_demo(root):
    rng = np.random.default_rng(0)
    for name, im in photos().items():
        W, H = im.size
        (root / name).mkdir()
        for k in range(CROPS_PER_PHOTO):
            w, h = (int(v) for v in rng.integers(96, 161, size=2))
            zoom = rng.uniform(1.0, min(2.5, W / w, H / h))  # crop a larger region and shrink it
            cw, ch = int(w * zoom), int(h * zoom)
            x, y = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
            crop = im.resize((w, h), Image.BICUBIC, box=(x, y, x + cw, y + ch))
            crop.save(root / name / f"{name}_{k:03d}.jpg", quality=90)


def demo_root():
    """Path of the demo ImageFolder (built on first call)."""
    return _build_once(f"demo-{VERSION}", _build_demo)


def _build_digits(root, size=32):
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    n_val = len(order) // 5
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = root / split / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        a = (d.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        Image.fromarray(a, "L").resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i:04d}.png")


def digits_root(split="train"):
    """Path of the digits ImageFolder for `split` ("train" or "val"; built on first call)."""
    if split not in ("train", "val"):
        raise ValueError(f"digits_root: split expected 'train' or 'val', got {split!r}")
    return _build_once(f"digits-{VERSION}", _build_digits) / split
