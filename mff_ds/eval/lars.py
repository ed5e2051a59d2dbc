"""LARS as the linear probe's two references compute it.

Our own class because neither convention is a library's: timm's `Lars` (and official MAE's) multiply the update by
the lr *after* the momentum buffer; mmpretrain's `LARS` (mmpretrain/engine/optimizers/lars.py, the optimizer of
its linear-probe config) multiplies it *before*, so the buffer holds lr-scaled steps. With a constant lr the two
are the same; under warmup and cosine they are not. The trust ratios differ too:

- `mmpretrain`: local_lr = eta |w| / (|g| + wd |w| + eps) (1 where |w| or |g| is 0, or for an excluded
  parameter); d = (g + wd w) x local_lr x lr; buf = d on the first step, else momentum x buf + d; w -= buf.
- `mae` (facebookresearch/mae util/lars.py): for a parameter that is not excluded, d = g + wd w and
  q = eta |w| / |d| (1 where |w| or |d| is 0), d = d x q; an excluded one takes d = g (no decay);
  mu = momentum x mu + d (mu from 0); w -= lr x mu.

A group's `lars_exclude` (default False) excludes its parameters: official MAE excludes the 1-D ones
(`optim.lars_exclude_1d`), mmpretrain's config excludes none. Norms stay on the device (no host sync).
"""
import torch

CONVENTIONS = ("mmpretrain", "mae")


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, convention: str, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coeff: float = 0.001, eps: float = 1e-8):
        if convention not in CONVENTIONS:
            raise ValueError(f"LARS convention: expected one of {list(CONVENTIONS)}, got {convention!r}")
        self.convention = convention
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coeff=trust_coeff,
                                      eps=eps, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # a group restored from a checkpoint of timm's Lars (before 2026-12-04) names the flag always_adapt
            exclude = group.get("lars_exclude", not group.get("always_adapt", True))
            for p in group["params"]:
                if p.grad is not None:
                    (self._mmpretrain if self.convention == "mmpretrain" else self._mae)(p, group, exclude)
        return loss

    def _mmpretrain(self, p, group, exclude: bool) -> None:
        g, wd, lr = p.grad, group["weight_decay"], group["lr"]
        d = g.add(p, alpha=wd)
        if not exclude:
            w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
            local = group["trust_coeff"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            d = d * torch.where((w_norm != 0) & (g_norm != 0), local, torch.ones_like(local))
        d = d.mul_(lr)
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = d.clone()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(d)
        p.sub_(state["momentum_buffer"])

    def _mae(self, p, group, exclude: bool) -> None:
        d = p.grad
        if not exclude:
            d = d.add(p, alpha=group["weight_decay"])
            w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
            one = torch.ones_like(w_norm)
            q = torch.where(w_norm > 0, torch.where(d_norm > 0, group["trust_coeff"] * w_norm / d_norm, one), one)
            d = d.mul(q)
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"].mul_(group["momentum"]).add_(d)
        p.add_(buf, alpha=-group["lr"])
