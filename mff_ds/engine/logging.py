"""Rank-0 observability: metrics.jsonl + TensorBoard, the tqdm progress bar, reconstruction grids, MFU."""
import json
import os
import resource
from typing import Optional

import torch

from mff_ds.common import atomic_write

# Dense peak TFLOP/s per device for the 16-bit tensor cores (fp32 runs use the same figure: MFU is then low).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0,
               "L4": 121.0, "B200": 2250.0, "GH200": 989.0, "MI300X": 1307.0, "MI250": 362.0}


def peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def memory_gb(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem/allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
                "mem/peak_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"mem/host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsLogger:
    """Writes one JSON line per logging step and the same scalars to TensorBoard (rank 0 only)."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.tb = None
        self.f = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.f = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, img, step)

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def progress_bar(enabled: bool, total: int, initial: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, smoothing=0.1)


# ------------------------------------------------------------------ reconstructions
def reconstruction_grid(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                        mean, std, norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """(3, H', W') grid in [0,1]: one row per image with original | masked | reconstruction (visible patches
    pasted from the original). With norm-pix loss, pred is de-normalised with the target patch mean/var."""
    from torchvision.utils import make_grid

    from mff_ds.kernels.loss import patchify, unpatchify
    images, pred, mask = images.float().cpu(), pred.detach().float().cpu(), mask.detach().float().cpu()
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    target = patchify(images, patch_size)
    if norm_pix:
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + eps).sqrt() + mu
    M = unpatchify(mask.unsqueeze(-1).expand_as(target).contiguous(), patch_size)  # 1 = masked pixel
    orig = (images * std + mean).clamp(0, 1)
    recon = (unpatchify(pred, patch_size) * std + mean).clamp(0, 1)
    rows = torch.stack([orig, orig * (1 - M) + 0.5 * M, recon * M + orig * (1 - M)], dim=1)
    return make_grid(rows.flatten(0, 1), nrow=3, padding=2, pad_value=1.0)


def save_png(img: torch.Tensor, path: str) -> None:
    from torchvision.utils import save_image
    atomic_write(path, lambda tmp: save_image(img, tmp, format="png"))
