"""What a resumed run must share with its checkpoint, and what an upgrade of mff-ds may change under a run in flight.

A checkpoint's completion marker records the recipe's `compat_dict()` (what a run cannot change: model, data
stream, seed, precision, schedule, global batch, lr), the whole recipe and the ZeRO stage. `reconcile` compares them
with the recipe starting now, key by key:

- the checkpoint does not record the key (a later version added it), or records the legacy schedule
  (checkpoint.migrate): the recipe's value; a compatible change, named in the warning;
- the user set the key by hand (`--set`, or their own YAML file) and it differs: refused, listed;
- the user did not set it (a default, or a shipped recipe's value) and the run is the same recipe (its name): this
  version changed a default under a run in flight, so the run keeps its saved value, named in the warning;
- the ZeRO stage follows the same rule: a ZeRO-2 run of a recipe that now ships ZeRO-1 keeps ZeRO-2;
- any other setting that differs (workers, logging, ...) is a compatible change, named in the warning.
"""
import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

from .recipe import resolve_path
from .schedule import LEGACY

ABSENT = "<absent>"
DEEPSPEED_KEYS = ("deepspeed.config", "deepspeed.zero_stage", "deepspeed.overrides")  # decide the ZeRO stage
NEVER_KEPT = ("task",)  # a recipe of another task never continues a run, whatever its defaults say


@dataclass
class Reconciled:
    incompatible: List[str] = field(default_factory=list)  # 'key: checkpoint A -> recipe B': refused
    kept: List[str] = field(default_factory=list)          # the run's saved values, now set on the recipe
    changed: List[str] = field(default_factory=list)       # compatible changes

    def warning(self) -> Optional[str]:
        """One warning naming every kept value and compatible change; None when there is none."""
        lines = [f"kept: {k}" for k in self.kept] + [f"changed: {c}" for c in self.changed]
        return "\n  ".join(lines) if lines else None


def differences(old: dict, new: dict, prefix: str = "", only_new: bool = False) -> List[Tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every nested key that differs (only_new: keys of `new` only);
    ABSENT where a side lacks the key."""
    out = []
    for k in sorted(set(new) if only_new else set(old) | set(new)):
        a, b = old.get(k, ABSENT), new.get(k, ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.", only_new)
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def describe(diffs: List[Tuple[str, Any, Any]]) -> List[str]:
    return [f"{k}: checkpoint {a!r} -> recipe {b!r}" for k, a, b in diffs]


def set_key(recipe, key: str, value) -> None:
    """Set dotted `key` of a recipe (sections are attributes, free-form sections such as `model` dicts)."""
    *path, last = key.split(".")
    node = recipe
    for k in path:
        node = node[k] if isinstance(node, dict) else getattr(node, k)
    if isinstance(node, dict):
        node[last] = copy.deepcopy(value)
    else:
        setattr(node, last, copy.deepcopy(value))


def reconcile(meta: dict, recipe, zero_stage: int, keep: bool = True) -> Reconciled:
    """Compare checkpoint marker `meta` (checkpoint.migrate'd) with `recipe` (whose DeepSpeed config has ZeRO stage
    `zero_stage`) and set the run's saved values on `recipe` where the rules above keep them (keep=False: keep none,
    every difference of a binding key is incompatible). The caller checks the recipe again and rebuilds what depends
    on it: `resume_recipe` does both."""
    out = Reconciled()
    if "compat" not in meta:  # a marker with a hash only: equal or refused
        if meta.get("recipe_hash") not in (None, recipe.compat_hash()):
            out.incompatible.append("(recipe hash differs)")
        return out
    saved = meta.get("recipe") or {}
    same_run = (meta.get("name") or saved.get("name")) in (None, recipe.name)
    binding = differences(meta["compat"], recipe.compat_dict(), only_new=True)
    for key, a, b in binding:
        if a == ABSENT or a == LEGACY:
            why = "not recorded by the version that wrote the checkpoint" if a == ABSENT else f"the checkpoint's: {a}"
            out.changed.append(f"{key}: {why}; continuing with the recipe's {b!r}")
        elif keep and same_run and key not in NEVER_KEPT and not recipe.by_hand(key):
            set_key(recipe, key, a)
            if key.startswith("batch.") and recipe._requested is not None:  # what the batch plan is made from
                recipe._requested[key[len("batch."):]] = a
            out.kept.append(f"{key}: the run's {a!r} (the recipe as started now says {b!r}; set it by hand to change it)")
        else:
            out.incompatible.append(f"{key}: checkpoint {a!r} -> recipe {b!r}")
    stage = meta.get("zero_stage")
    if (keep and stage is not None and stage != zero_stage and not meta.get("universal") and same_run
            and not any(recipe.by_hand(k) for k in DEEPSPEED_KEYS)):
        ds = saved.get("deepspeed") or {}
        if ds.get("config") and os.path.isfile(resolve_path(ds["config"])):  # the run's own settings, still there
            recipe.deepspeed.config, recipe.deepspeed.zero_stage = ds["config"], ds.get("zero_stage")
        else:
            recipe.deepspeed.zero_stage = stage
        out.kept.append(f"deepspeed: the run's ZeRO stage {stage} (this version's recipe uses stage {zero_stage}: "
                        f"DeepSpeed cannot load one stage's optimizer state into another; a fresh run gets it)")
    if not out.incompatible and saved:
        named = {key for key, _, _ in binding}
        # a key this version added, left at its default, is what the run had before it existed: not a change
        out.changed += describe([d for d in differences(saved, recipe.to_dict()) if d[0] not in named
                                 and not (d[1] == ABSENT and not recipe.by_hand(d[0]))])
    return out


def resume_recipe(meta: dict, recipe, zero_stage: int, recheck: Callable[[], int]) -> Reconciled:
    """`reconcile`, then, when it kept saved values, `recheck()` (the caller settles what the kept values decide, e.g.
    a fine-tune's encoder from its kept init.checkpoint, checks the recipe for its world size, which plans the batch
    from them, and returns the ZeRO stage of its DeepSpeed config) and a second comparison that keeps nothing: it
    decides what is refused. A kept value this start cannot honour (a saved global batch that does not split over
    the new world size) is refused, never trained with something else."""
    out = reconcile(meta, recipe, zero_stage)
    if out.kept:  # compared again with what the kept values bring along (a fine-tune's kept init.checkpoint brings
        again = reconcile(meta, recipe, recheck(), keep=False)  # its encoder, which the recipe's model gives way to)
        out.incompatible, out.changed = again.incompatible, again.changed
    return out
