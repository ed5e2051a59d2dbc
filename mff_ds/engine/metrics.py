"""Rank-0 observability: metrics.jsonl + TensorBoard, the tqdm progress bar, device memory."""
import json
import os
import resource

import torch


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
