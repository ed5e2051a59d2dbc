"""The pretraining recipe: YAML + `--set a.b=c` overrides -> a validated `Recipe` (the shared sections from
mff_ds.engine.recipe, plus the `model:` and `data:` sections checked by their own packages).

Every problem (unknown key, wrong type, impossible batch arithmetic, bad model or data option) is collected
and raised at once as a `RecipeError`, before any work starts.
"""
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from mff_ds.engine.recipe import (BatchConfig, CheckpointConfig, DeepSpeedSection, LoggingConfig, OptimConfig,
                                  RecipeError, RecipeMethods, ScheduleConfig, _build, launcher_world_size, read_tree,
                                  schedule_and_deepspeed_problems)


@dataclass
class Recipe(RecipeMethods):
    name: str = "run"
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    on_nonfinite: Literal["stop", "rollback"] = "stop"
    max_rollbacks: int = 3
    model: Dict[str, Any] = field(default_factory=lambda: {"arch": "mff_vit_base_patch16"})
    data: Any = None                  # mff_ds.data.DataConfig
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def model_config(self):
        """The resolved mff_ds.models.ModelConfig."""
        from mff_ds.models import resolve_config
        return resolve_config(dict(self.model))

    def compat_dict(self) -> dict:
        """What a resumed run must share with its checkpoint (shapes, schedule, data stream, numerics)."""
        d = self.to_dict()
        # speed only; `decode` (cpu | gpu) draws the same crops and flips, its resize rounds pixels differently
        data = {k: v for k, v in d["data"].items() if k not in ("pin_memory", "prefetch_factor", "decode")}
        from mff_ds.data import SOURCES  # here: it imports torch (see load_recipe)
        if not SOURCES.get(data["source"]).workers_pick_samples:  # shards: split among the workers
            data.pop("num_workers", None)
        return {"model": dict(self.model_config().to_dict(), arch=self.model.get("arch")),
                "data": data, "seed": d["seed"], "precision": d["precision"],
                "batch.global_batch": d["batch"]["global_batch"], "schedule": d["schedule"],
                "optim.base_lr": d["optim"]["base_lr"], "optim.min_lr": d["optim"]["min_lr"]}


def _data_config_cls():
    from mff_ds.data import DataConfig
    return DataConfig


def _model_problems(model: dict) -> List[str]:
    from mff_ds.models import ModelConfig
    from mff_ds.models.archs import config_problems
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    p = [f"model.{k}: unknown key; expected arch or one of {sorted(known)}" for k in model if k not in known | {"arch"}]
    spec = {k: v for k, v in model.items() if k in known | {"arch"}}
    if "arch" in spec and not isinstance(spec["arch"], str):
        return p + [f"model.arch: expected an architecture name (str), got {spec['arch']!r}"]
    cfg, problems = config_problems(spec)
    if cfg is not None and cfg.len_keep >= cfg.num_patches:  # the loss is taken over masked patches only: 0/0
        problems = [f"model.mask_ratio: masks no patch of {cfg.num_patches} (ratio {cfg.mask_ratio}); expected a "
                    f"ratio that masks at least one, e.g. 0.75"]
    return p + problems


def check(recipe: Recipe, world_size: Optional[int] = None) -> List[str]:
    """Semantic checks; returns the list of problems (empty = runnable)."""
    p = []
    if not recipe.name or "/" in recipe.name:
        p.append(f"name: expected a non-empty name without '/', got {recipe.name!r}")
    b = recipe.batch
    for k in ("global_batch", "micro_batch"):
        if getattr(b, k) <= 0:
            p.append(f"batch.{k}: expected a positive integer, got {getattr(b, k)}")
    if world_size is not None and b.global_batch > 0 and b.micro_batch > 0:
        per_step = b.micro_batch * world_size
        if b.global_batch % per_step:
            p.append(f"batch.global_batch: {b.global_batch} cannot be formed from micro_batch {b.micro_batch} x "
                     f"world size {world_size} = {per_step} images per micro-step; expected a multiple of {per_step}")
    o = recipe.optim
    if o.base_lr <= 0:
        p.append(f"optim.base_lr: expected > 0, got {o.base_lr}")
    if o.min_lr < 0 or o.min_lr > o.base_lr * b.global_batch / 256:
        p.append(f"optim.min_lr: expected in [0, lr = base_lr*global_batch/256], got {o.min_lr}")
    if len(o.betas) != 2 or not all(isinstance(x, float) and 0 <= x < 1 for x in o.betas):
        p.append(f"optim.betas: expected two numbers in [0, 1), got {o.betas}")
    if o.eps <= 0:
        p.append(f"optim.eps: expected > 0, got {o.eps}")
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay: expected >= 0, got {o.weight_decay}")
    if o.grad_clip < 0:
        p.append(f"optim.grad_clip: expected >= 0 (0 = off), got {o.grad_clip}")
    p += schedule_and_deepspeed_problems(recipe.schedule, recipe.deepspeed)
    reserved = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "optimizer", "scheduler", "gradient_clipping"}
    for k in sorted(reserved & set(recipe.deepspeed.overrides)):
        p.append(f"deepspeed.overrides.{k}: set by the recipe (batch / optim sections), not by overrides")
    c = recipe.checkpoint
    if c.every_steps < 0:
        p.append(f"checkpoint.every_steps: expected >= 0 (0 = only at the end), got {c.every_steps}")
    if c.keep_last < 1:
        p.append(f"checkpoint.keep_last: expected >= 1, got {c.keep_last}")
    lg = recipe.logging
    if lg.every_steps < 1:
        p.append(f"logging.every_steps: expected >= 1, got {lg.every_steps}")
    if lg.image_every_steps < 0:
        p.append(f"logging.image_every_steps: expected >= 0 (0 = off), got {lg.image_every_steps}")
    if lg.num_images < 1:
        p.append(f"logging.num_images: expected >= 1, got {lg.num_images}")
    if recipe.max_rollbacks < 0:
        p.append(f"max_rollbacks: expected >= 0, got {recipe.max_rollbacks}")
    # model: through the model package's own checks
    p.extend(_model_problems(recipe.model))
    # data: the data package's own checks
    if recipe.data is not None and hasattr(recipe.data, "validate"):
        p.extend(m if m.startswith("data.") else f"data.{m}" for m in recipe.data.validate())
    return p


def from_dict(tree: dict, world_size: Optional[int] = None, source: str = "recipe") -> Recipe:
    problems: List[str] = []
    tree = copy.deepcopy(tree or {})
    data = tree.pop("data", None)
    recipe = _build(Recipe, tree, "", problems)
    recipe.data = _build(_data_config_cls(), data, "data", problems)
    # semantic checks too, minus those on keys whose value was already rejected (they would see defaults)
    rejected = {q.split(":", 1)[0] for q in problems}
    problems += [q for q in check(recipe, world_size) if q.split(":", 1)[0] not in rejected]
    if problems:
        raise RecipeError(problems, source)
    return recipe


def load_recipe(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                world_size: Optional[int] = None) -> Recipe:
    """Read YAML `path` (None: an all-defaults recipe), apply `--set` overrides, validate.

    world_size: for the batch arithmetic; None = from the launcher environment (1 if none)."""
    tree, source = read_tree(path, overrides)
    return from_dict(tree, launcher_world_size() if world_size is None else world_size, source)
