"""The pretraining recipe: YAML + `--set a.b=c` overrides -> a validated `Recipe` (the shared sections from
mff_ds.engine.recipe, plus the `model:` and `data:` sections that mff_ds.models and mff_ds.data define).

Every problem (unknown key, wrong type, out of range, impossible batch arithmetic, bad model or data option) is
collected and raised at once as a `RecipeError`, before any work starts.
"""
from typing import Annotated, List, Optional

from pydantic import AfterValidator, Field, field_validator

from mff_ds import zoo
from mff_ds.data import SOURCES, DataConfig
from mff_ds.engine.recipe import (BaseRecipe, CheckpointConfig, OptimConfig, check, launcher_world_size, read_tree,
                                  validate)
from mff_ds.models import ModelConfig, ModelSection, ModelSpec
from mff_ds.schema import fail

__all__ = ["Recipe", "check", "from_dict", "load_recipe"]


class Recipe(BaseRecipe):
    model: ModelSpec = Field(default_factory=lambda: {"arch": "mff_vit_base_patch16"})
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    # continue pretraining from released weights: a file (mmpretrain, official MAE, ours) or a zoo name. Weights
    # only (fresh optimizer and schedule), loaded on a fresh start; a run resuming its own checkpoint ignores it
    init_from: Annotated[Optional[str], AfterValidator(zoo.check_source)] = None

    @field_validator("model")
    @classmethod
    def _masks_a_patch(cls, spec):
        cfg = ModelSection.model_validate(spec)
        if cfg.len_keep >= cfg.num_patches:  # the loss is taken over masked patches only: 0/0
            fail([("mask_ratio", f"masks no patch of {cfg.num_patches} (ratio {cfg.mask_ratio}); expected a ratio "
                                 f"that masks at least one, e.g. 0.75")])
        return spec

    def model_cfg(self) -> ModelConfig:
        """The resolved mff_ds.models.ModelConfig (not `model_config`: pydantic's name for a model's settings)."""
        return ModelSection.model_validate(self.model).config()

    def compat_dict(self) -> dict:
        """What a resumed run must share with its checkpoint (shapes, schedule, data stream, numerics)."""
        d = self.to_dict()
        # speed only; `decode` (cpu | gpu) draws the same crops and flips, its resize rounds pixels differently
        # data.index binds like the other data settings, None included (checkpoint.migrate gives older markers None)
        data = {k: v for k, v in d["data"].items() if k not in ("pin_memory", "prefetch_factor", "decode")}
        if not SOURCES.get(data["source"]).workers_pick_samples:  # shards: split among the workers
            data.pop("num_workers", None)
        # model.kernels picks an implementation of the same ops (a Triton kernel or the reference), like decode
        model = {k: v for k, v in self.model_cfg().to_dict().items() if k != "kernels"}
        return {"model": dict(model, arch=self.model.get("arch")),
                "data": data, "seed": d["seed"], "precision": d["precision"],
                "batch.global_batch": d["batch"]["global_batch"], "schedule": d["schedule"],
                "optim.base_lr": d["optim"]["base_lr"], "optim.min_lr": d["optim"]["min_lr"]}


def from_dict(tree: dict, world_size: Optional[int] = None, source: str = "recipe") -> Recipe:
    return validate(Recipe, tree, world_size, source)


def load_recipe(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                world_size: Optional[int] = None) -> Recipe:
    """Read YAML `path` (None: an all-defaults recipe), apply `--set` overrides, validate.

    world_size: for the batch arithmetic; None = from the launcher environment (1 if none)."""
    tree, source, by_hand = read_tree(path, overrides)
    return validate(Recipe, tree, launcher_world_size() if world_size is None else world_size, source, by_hand)
