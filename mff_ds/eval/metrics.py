"""Top-k accuracy over a (distributed) validation set, and the printed results table."""
from typing import Callable, Dict, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the k highest logits, for each k (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices                       # (B, kmax)
    hit = top.eq(target.view(-1, 1))
    return torch.stack([hit[:, :min(k, kmax)].any(1).sum() for k in ks]).float()


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
             dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """top1 / top5 (percent), mean cross-entropy and sample count over every rank's share of `loader`."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)    # correct@1, correct@5, loss sum, n
    for batch in loader:
        if batch is None:  # every image of the batch was unreadable (eval.data leaves them out)
            continue
        images, target = batch
        images = images.to(device, non_blocking=True).to(dtype)
        target = target.to(device, non_blocking=True)
        logits = forward(images).float()
        c = topk_correct(logits, target)
        sums[0] += c[0]
        sums[1] += c[1]
        sums[2] += F.cross_entropy(logits, target, reduction="sum").double()
        sums[3] += target.numel()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    n = max(sums[3].item(), 1.0)
    return {"top1": 100 * sums[0].item() / n, "top5": 100 * sums[1].item() / n, "val_loss": sums[2].item() / n,
            "val_samples": int(sums[3].item())}


def table(rows: Sequence[dict], columns: Sequence[str] = ("name", "top1", "top5")) -> str:
    """Plain-text table; floats with 2 decimals."""
    cells = [[f"{r.get(c, ''):.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(list(columns)), line(["-" * w for w in widths])] + [line(r) for r in cells])
