"""The learning rate of every optimizer step and param group, exactly as the reference a recipe names trains it.

Two references, set by a recipe's `schedule.reference`:

- `mmengine` (mmpretrain's configs): `LinearLR(start_factor, begin=0, end=W)` then `CosineAnnealingLR(T_max=E-W,
  begin=W, end=E, eta_min)`, both `convert_to_iter_based`, stepped once per iteration. Warmup lasts
  N = int(W * iters_per_epoch) iterations and reaches the peak at iteration N-1 (LinearLR's total_iters is
  end - begin - 1); the cosine then anneals *each group* from its own initial lr (base lr x layer-decay scale) to the
  same absolute eta_min (`optim.min_lr`). A 1-iteration warmup leaves the cosine starting from base x start_factor,
  as mmengine's chained form does.
- `mae` (facebookresearch/mae `util/lr_sched.adjust_learning_rate`): evaluated on the fractional epoch
  `micro-batch index / len(data_loader) + epoch` at the first micro-batch of each optimizer step; warmup
  `lr * t / W` (from `start_factor` x lr: 0 is official MAE's), then half-cosine to `min_lr`, the whole value
  multiplied by the group's `lr_scale` (so min_lr is scaled per group too).

mmengine computes its values in a chained (recursive) form; the closed forms here equal them to ~1e-12 relative
(the cosine's `1 + cos(pi k / T)` is evaluated with the same float expression, so the chain telescopes onto it).
`tests/test_schedule.py` compares both with the reference's own numbers.
"""
import math
from dataclasses import dataclass

REFERENCES = ("mmengine", "mae")
# what a checkpoint written before schedules named their reference recorded (checkpoint.migrate fills it in):
# warmup reached the peak one step later than mmengine's, min_lr was scaled per group; resuming it warns, never
# refuses (engine.compat.reconcile)
LEGACY = "legacy (mff-ds before 2026-12-04: warmup peak at iteration N, min_lr x lr_scale)"


@dataclass(frozen=True)
class LrSchedule:
    reference: str           # "mmengine" | "mae"
    peak: float              # the recipe's lr (base_lr x global_batch / 256)
    min_lr: float
    start_factor: float
    epochs: int
    warmup_epochs: float
    steps_per_epoch: int     # optimizer steps per epoch (mmengine's iterations per epoch)
    batches_per_epoch: int   # micro-batches per epoch on one rank (official MAE's len(data_loader))
    accum: int = 1           # micro-batches per optimizer step

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"schedule.reference: expected one of {list(REFERENCES)}, got {self.reference!r}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        """Optimizer steps before the cosine starts (mmengine converts epochs to iterations with int())."""
        return int(self.warmup_epochs * self.steps_per_epoch)

    def lr(self, step: int, scale: float = 1.0) -> float:
        """The lr of optimizer step `step` (0-based) for a param group whose initial lr is peak x `scale`."""
        if self.reference == "mmengine":
            return self._mmengine(step, scale)
        return self._mae(step) * scale

    def _mmengine(self, step: int, scale: float) -> float:
        base, sf, n = self.peak * scale, self.start_factor, self.warmup_steps
        if step < n:  # LinearLR: total_iters = n - 1, so iteration n-1 is at the peak
            return base * (sf + (1.0 - sf) * step / (n - 1)) if n > 1 else base * sf
        start = base * sf if n == 1 else base  # the cosine anneals from whatever the warmup left
        t_max = (self.epochs - self.warmup_epochs) * self.steps_per_epoch
        eta = self.min_lr
        return eta + (start - eta) * (1 + math.cos(math.pi * (step - n) / t_max)) / 2

    def _mae(self, step: int) -> float:
        e, k = divmod(step, self.steps_per_epoch)
        t = k * self.accum / self.batches_per_epoch + e  # data_iter_step / len(data_loader) + epoch
        w, peak, lo = self.warmup_epochs, self.peak, self.min_lr
        if t < w:
            return peak * (self.start_factor + (1.0 - self.start_factor) * t / w)
        return lo + (peak - lo) * 0.5 * (1.0 + math.cos(math.pi * (t - w) / (self.epochs - w)))

    def apply(self, optimizer, step: int) -> None:
        """Set every param group's lr for optimizer step `step` (a group's `lr_scale`: layer decay, default 1)."""
        for g in optimizer.param_groups:
            g["lr"] = self.lr(step, g.get("lr_scale", 1.0))


def lr_schedule(recipe, batches_per_epoch: int, accum: int) -> LrSchedule:
    """The schedule of a recipe (its `schedule` and `optim` sections, `lr()`) for an epoch of `batches_per_epoch`
    micro-batches per rank and `accum` micro-batches per optimizer step."""
    s = recipe.schedule
    return LrSchedule(s.reference, recipe.lr(), recipe.optim.min_lr, s.warmup_start_factor, s.epochs,
                      s.warmup_epochs, batches_per_epoch // accum, batches_per_epoch, accum)
