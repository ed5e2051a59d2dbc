"""The batch arithmetic of a recipe on a world size: global batch = ranks x micro batch x accumulation steps.

`batch.micro_batch` is the most one rank holds in a forward. On W ranks a global batch G splits exactly when
k = G / W is a whole number of images per rank; the micro batch is then the largest divisor of k up to the maximum
(and a multiple of `multiple`, e.g. 2 for Mixup's pairs), the accumulation k / micro. Where no split is exact (4096
images on 3, 6, 12 or 24 ranks), `nearest` names the closest global batches below and above that split with an
efficient micro batch: at least half the largest one that the fewest accumulation steps allow.

Both searches are bounded: with M the largest multiple of `multiple` up to the maximum micro batch, every count per
rank that M divides splits efficiently (micro >= M > maximum / 2), so `nearest` looks at most M counts each way.
"""
import math
from dataclasses import dataclass
from typing import List, Optional


@dataclass(frozen=True)
class BatchPlan:
    """What one optimizer step is on `world` ranks; `lr` = base_lr x global_batch / 256 once a recipe planned it
    (engine.recipe: the one plan the check, the DeepSpeed config, the loader, the schedule and the marker read)."""
    global_batch: int
    micro: int
    accum: int
    world: int
    lr: Optional[float] = None

    def describe(self) -> str:
        return (f"{self.global_batch} images per step = {self.world} rank(s) x micro batch {self.micro} x "
                f"{self.accum} accumulation step(s)")


def split(global_batch: int, max_micro: int, world: int, multiple: int = 1) -> Optional[BatchPlan]:
    """The exact split with the largest micro batch, or None."""
    if global_batch % world or multiple > max_micro:
        return None
    k = global_batch // world
    for accum in range(math.ceil(k / max_micro), k + 1):
        if k % accum == 0 and (k // accum) % multiple == 0:
            return BatchPlan(global_batch, k // accum, accum, world)
    return None


def efficient(plan: Optional[BatchPlan], max_micro: int) -> bool:
    """The micro batch is at least half of the largest that the fewest accumulation steps would allow."""
    if plan is None:
        return False
    k = plan.global_batch // plan.world
    return 2 * plan.micro >= math.ceil(k / math.ceil(k / max_micro))


def nearest(global_batch: int, max_micro: int, world: int, multiple: int = 1) -> List[BatchPlan]:
    """The closest efficient exact splits below and above `global_batch` (below first; one when none is below).
    ValueError when `multiple` exceeds `max_micro` (no micro batch can be a multiple of it)."""
    if not 1 <= multiple <= max_micro:
        raise ValueError(f"expected a micro batch multiple in [1, {max_micro}], got {multiple}")
    reach = max_micro // multiple * multiple  # M: within M counts either way one is a multiple of M (docstring)
    out = []
    for direction in (-1, 1):
        k = global_batch // world + (1 if direction > 0 else 0)
        for _ in range(reach + 1):
            if k < 1:
                break
            plan = split(k * world, max_micro, world, multiple)
            if efficient(plan, max_micro) and plan.global_batch != global_batch:
                out.append(plan)
                break
            k += direction
    return out


def lr_for(base_lr: float, global_batch: int) -> float:
    """The references' linear scaling: lr = base_lr x global batch / 256."""
    return base_lr * global_batch / 256
