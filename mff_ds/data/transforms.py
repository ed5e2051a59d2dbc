"""Image bytes -> augmented uint8 (3, S, S) tensor.

Decoding: JPEGs go through libjpeg-turbo (simplejpeg) and, when the crop allows it, are decoded at 1/2, 1/4
or 1/8 size in the DCT domain (`fast=True`); everything else (and `fast=False`) goes through PIL, which also
converts grayscale, CMYK, palette, alpha and 16-bit images to 8-bit RGB and applies EXIF rotation.
Anything that cannot be decoded raises `BadImage`; the loader counts and skips it.

Augmentations, registered by name in `AUGMENTS` (what `data.augment` names): a class built with the output size S
whose `sample(w, h, rng)` draws the parameters (as torchvision draws them), `need(p)` says the decoded size they
need, `apply(x, p)` crops and resizes (torch's uint8 antialiased kernels, which match PIL's to within 1-2 grey
levels) a (3, H, W) tensor on any device, uint8 (the CPU path) or float (the device path, `decode.py`, rounded
once at the end by `to_uint8`), and `torchvision()` is the PIL pipeline it reproduces (the benchmarks' baseline):
  "mff"    the MFF reference configs' pipeline (mmpretrain mff_vit-base-p16_*_in1k, reference doc section 3.1,
           what the released checkpoints presumably used; whether the paper used it is unverified):
           Resize(S) short side (bilinear) -> RandomCrop(S, padding=4, reflect) -> hflip
  "mae"    MAE's pipeline, which the MFF configs replace: RandomResizedCrop(S, scale=(0.2, 1), bicubic) -> hflip
  "center" evaluation: Resize(S / 0.875) short side (bicubic) -> CenterCrop(S)
"""
import io
import math
import warnings

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from mff_ds.common import Registry

AUGMENTS = Registry("augment")
_EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """The bytes are not an image we can decode."""


# ----------------------------------------------------------------------------------------------- decoding
class LazyImage:
    """Image bytes whose header is read at once and whose pixels on demand: `size` (w, h) after EXIF rotation,
    `decode(min_w, min_h)` -> RGB uint8 HWC, at reduced size where the JPEG allows it."""

    def __init__(self, data, fast):
        self.data = data
        self.jpeg = _fast_jpeg_size(data) if fast else None
        if self.jpeg is not None:
            self.size = self.jpeg
            return
        try:
            self.img = Image.open(io.BytesIO(data))
        except Exception as e:
            raise BadImage(f"not an image: {e}") from None
        try:
            orientation = self.img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a broken EXIF block does not make a broken image
            orientation = 1
        w, h = self.img.size
        self.size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        self.orientation, self.rotated, self.fast = orientation, orientation in (5, 6, 7, 8), fast

    def decode(self, min_w, min_h):
        if self.jpeg is not None:
            w, h = self.jpeg
            k = _dct_factor(w, h, min_w, min_h)
            try:
                return simplejpeg.decode_jpeg(self.data, "RGB", min_height=-(-h // k), min_width=-(-w // k))
            except ValueError as e:
                raise BadImage(f"jpeg: {e}") from None
        img = self.img
        try:
            if self.fast and img.format == "JPEG" and img.mode in ("RGB", "L"):
                rw, rh = (min_h, min_w) if self.rotated else (min_w, min_h)
                img.draft("RGB", (max(rw, 1), max(rh, 1)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # palette-transparency and EXIF warnings
                img.load()
                if self.orientation != 1:
                    img = ImageOps.exif_transpose(img)
                return to_rgb_array(img)
        except BadImage:
            raise
        except Exception as e:
            raise BadImage(f"{type(e).__name__}: {e}") from None


def _fast_jpeg_size(data):
    """(w, h) if `data` is a YCbCr/gray JPEG without EXIF rotation that libjpeg-turbo can decode, else None."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL gets a chance, and names the problem
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None  # CMYK / YCCK: PIL converts them
    if b"Exif" in data[:65536]:
        try:
            if Image.open(io.BytesIO(data)).getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return None
        except Exception:
            return None
    return w, h


def _dct_factor(w, h, min_w, min_h):
    """Largest k in (8, 4, 2, 1) with the 1/k-size decode still >= (min_w, min_h). Only powers of two:
    libjpeg-turbo's other scale factors are slower than a full decode."""
    for k in (8, 4, 2):
        if -(-w // k) >= min_w and -(-h // k) >= min_h:
            return k
    return 1


def to_rgb_array(img):
    """PIL image of any mode -> RGB uint8 (H, W, 3) numpy array. 16-bit data keeps its top 8 bits."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        if mode.startswith("I;16") or a.max() > 255:
            a = a >> 8
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    elif mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    a = np.array(img)  # writable (torch.from_numpy warns on read-only arrays)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or min(a.shape[:2]) < 1:
        raise BadImage(f"unexpected decoded array {a.shape} {a.dtype}")
    return a


def decode_rgb(data, fast=True):
    """Decode image bytes to a full-size RGB uint8 (H, W, 3) array (raises BadImage)."""
    image = LazyImage(data, fast)
    return image.decode(*image.size)


# ------------------------------------------------------------------------------------------ augmentations
def _resize(x, h, w, mode):
    """(3, H, W) -> (3, h, w), antialiased like PIL. uint8 stays uint8 (torch's uint8 kernels, CPU only);
    float (the device path) stays float, unrounded (bicubic overshoots 0-255: `to_uint8` clamps at the end)."""
    if x.shape[1] == h and x.shape[2] == w:
        return x
    return F.interpolate(x[None], size=(h, w), mode=mode, antialias=True)[0]


def to_uint8(x):
    """Float pixels of the device path -> uint8, rounded and clamped as torch's uint8 kernels do."""
    return x.round().clamp_(0, 255).to(torch.uint8)


def _short_side(w, h, size):
    """torchvision Resize(size) output (w, h): short side -> size, long side truncated."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


@AUGMENTS.register("mff")
class MFFCrop:
    """Resize short side to S (bilinear) -> RandomCrop(S, padding=4, reflect) -> flip(p)."""

    pad = 4

    def __init__(self, size, flip=0.5):
        self.size, self.flip = size, flip

    def sample(self, w, h, rng):
        nw, nh = _short_side(w, h, self.size)
        i = int(rng.integers(0, nh + 2 * self.pad - self.size + 1))
        j = int(rng.integers(0, nw + 2 * self.pad - self.size + 1))
        return nw, nh, i - self.pad, j - self.pad, bool(rng.random() < self.flip)

    def need(self, p):
        return p[0], p[1]

    def apply(self, x, p):
        nw, nh, top, left, flip = p
        s = self.size
        x = _resize(x, nh, nw, "bilinear")
        if top < 0 or left < 0 or top + s > nh or left + s > nw:
            x = F.pad(x[None], (self.pad,) * 4, mode="reflect")[0]
            top, left = top + self.pad, left + self.pad
        x = x[:, top:top + s, left:left + s]
        return x.flip(-1) if flip else x

    def torchvision(self):
        from torchvision import transforms as T
        return T.Compose([T.Resize(self.size), T.RandomCrop(self.size, padding=self.pad, padding_mode="reflect"),
                          T.RandomHorizontalFlip(self.flip)])


@AUGMENTS.register("mae")
class MAECrop:
    """RandomResizedCrop(S, scale, ratio, bicubic) -> flip(p); parameters drawn as torchvision does."""

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5):
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip

    def sample(self, w, h, rng):
        area, log_r = w * h, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_r))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                i, j = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                break
        else:  # fallback: central crop at the nearest allowed ratio
            if w / h < min(self.ratio):
                cw, ch = w, int(round(w / min(self.ratio)))
            elif w / h > max(self.ratio):
                cw, ch = int(round(h * max(self.ratio))), h
            else:
                cw, ch = w, h
            i, j = (h - ch) // 2, (w - cw) // 2
        return w, h, i, j, ch, cw, bool(rng.random() < self.flip)

    def need(self, p):
        w, h, _, _, ch, cw, _ = p
        return math.ceil(self.size * w / cw), math.ceil(self.size * h / ch)

    def apply(self, x, p):
        w, h, i, j, ch, cw, flip = p
        dh, dw = x.shape[1:]
        sy, sx = dh / h, dw / w
        t, l = int(round(i * sy)), int(round(j * sx))
        b, r = max(t + 1, min(dh, int(round((i + ch) * sy)))), max(l + 1, min(dw, int(round((j + cw) * sx))))
        x = _resize(x[:, t:b, l:r], self.size, self.size, "bicubic")
        return x.flip(-1) if flip else x

    def torchvision(self):
        from torchvision import transforms as T
        return T.Compose([T.RandomResizedCrop(self.size, self.scale, self.ratio, T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(self.flip)])


@AUGMENTS.register("center")
class CenterCrop:
    """Resize short side to S/0.875 (bicubic) -> CenterCrop(S) (the usual evaluation transform)."""

    def __init__(self, size, crop_pct=0.875):
        self.size, self.resize = size, int(size / crop_pct)

    def sample(self, w, h, rng):
        return _short_side(w, h, self.resize)

    def need(self, p):
        return p

    def apply(self, x, p):
        nw, nh = p
        x = _resize(x, nh, nw, "bicubic")
        t, l = int(round((nh - self.size) / 2)), int(round((nw - self.size) / 2))
        return x[:, t:t + self.size, l:l + self.size]

    def torchvision(self):
        from torchvision import transforms as T
        return T.Compose([T.Resize(self.resize, T.InterpolationMode.BICUBIC), T.CenterCrop(self.size)])


def make_augment(name, size):
    """A registered augmentation name ('mff' | 'mae' | 'center' | ...) -> its object for output size `size`."""
    return AUGMENTS.get(name)(size)


def prepare(data, aug, rng, fast=True):
    """Image bytes -> (LazyImage, augmentation parameters drawn from `rng`); raises BadImage when the header
    cannot be read (then nothing is drawn). Both decode paths start here, so both draw alike."""
    image = LazyImage(data, fast)
    return image, aug.sample(*image.size, rng)


def finish(image, aug, p, fast=True):
    """LazyImage and its parameters p -> augmented uint8 (3, S, S) tensor: decoded at the size p needs, then
    `aug.apply`. The rest of `process`, for the device path's workers, which decide between the two steps."""
    return aug.apply(chw(decode_for(image, aug, p, fast)), p)


def process(data, aug, rng, fast=True):
    """Image bytes -> augmented uint8 (3, S, S) tensor; raises BadImage for undecodable data. What the CPU
    path's workers run on every sample."""
    image, p = prepare(data, aug, rng, fast)
    return finish(image, aug, p, fast)


def decode_for(image, aug, p, fast=True):
    """The pixels of LazyImage `image` that `aug.apply` needs for parameters p: RGB uint8 (H, W, 3), at reduced
    size when `fast`."""
    return image.decode(*(aug.need(p) if fast else image.size))


def chw(arr):
    """Decoded (H, W, 3) uint8 array -> (3, H, W) tensor view."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
