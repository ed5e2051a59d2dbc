"""Downstream recipes (fine-tune / linear probe): YAML + `--set a.b=c` overrides -> a validated `EvalRecipe`.

Same conventions as the pretraining recipe (mff_ds.engine.recipe): every problem is listed at once in a
`RecipeError`; the batch, deepspeed and logging sections are the pretraining ones (optim, schedule and checkpoint
subclass theirs), so `engine.optim.build_ds_config` takes an EvalRecipe as it is.
"""
from typing import Annotated, List, Literal, Optional

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from mff_ds import zoo
from mff_ds.engine.recipe import (BaseRecipe, BatchConfig, Betas, CheckpointBase, LoggingConfig, OptimBase,
                                  RunName, ScheduleConfig, check, launcher_world_size, read_tree, validate)
from mff_ds.models import ModelSpec
from mff_ds.schema import (Bool, Float, NonNegFloat, NonNegInt, PosFloat, PosInt, Probability, Section, fail, float_,
                           int_, problem)

__all__ = ["EvalRecipe", "check", "from_dict", "load_eval_recipe"]


class InitConfig(Section):
    # pretrained weights: a file (or checkpoint folder) or a zoo name (fetched when the run builds its model);
    # None = random encoder from `model`
    checkpoint: Annotated[Optional[str], AfterValidator(zoo.check_source)] = None
    format: Literal["auto", "mff_ds", "mmpretrain", "mae"] = "auto"


def _image_source(name: str) -> str:
    from mff_ds.data import SOURCES  # here: it imports torch, which this module does not at import
    images = [n for n in SOURCES.names() if not SOURCES.get(n).ready]  # evaluation transforms image files
    if name not in images:
        raise ValueError(f"expected one of {images}, got {name!r}")
    return name


class EvalData(Section):
    source: Annotated[str, AfterValidator(_image_source)] = "imagefolder"  # a mff_ds.data.SOURCES name that gives
                                                                          # images (digits: the demo set)
    train_path: Optional[str] = None          # ImageFolder root or shard pattern
    val_path: Optional[str] = None
    train_index: Optional[str] = None         # imagefolder: dataset index or mmpretrain list file (data.index in
    val_index: Optional[str] = None           # pretraining; docs/DATA.md); None: found or built
    allow_missing: Bool = False               # files a list file names that are not there: left out, named (true)
    train_samples: Optional[PosInt] = None    # webdataset without _info.json
    val_samples: Optional[PosInt] = None
    num_classes: Optional[int_(ge=2)] = None  # None = number of ImageFolder classes
    img_size: Optional[PosInt] = None         # None = the pretrained image size (else pos-embed resampled)
    num_workers: NonNegInt = 8
    pin_memory: Bool = True


def _crop_scale(v: List[float]) -> List[float]:
    if len(v) != 2 or not 0 < v[0] <= v[1] <= 1:
        raise ValueError(f"expected [min, max] with 0 < min <= max <= 1, got {v}")
    return v


class AugConfig(Section):
    crop_scale: Annotated[List[Float], AfterValidator(_crop_scale)] = [0.08, 1.0]  # RandomResizedCrop
    hflip: Probability = 0.5
    interpolation: str = "bicubic"
    auto_augment: Optional[str] = None        # fine-tune: rand-m9-mstd0.5-inc1
    reprob: Probability = 0.0                 # random erasing
    remode: str = "pixel"
    mixup: NonNegFloat = 0.0                  # alpha; 0 = off
    cutmix: NonNegFloat = 0.0
    mixup_prob: Probability = 1.0
    mixup_switch_prob: Probability = 0.5
    smoothing: float_(ge=0, lt=1) = 0.0
    val_crop_pct: float_(gt=0, le=1) = 0.875  # resize short side to size / 0.875 (256 for 224), center crop
    val_interpolation: str = "bicubic"


class HeadConfig(Section):
    drop_path: float_(ge=0, lt=1) = 0.0
    init_std: PosFloat = 2e-5                 # trunc-normal std of the new Linear head (bias 0)


class EvalOptim(OptimBase):
    name: Literal["adamw", "lars"] = "adamw"
    base_lr: PosFloat = 5e-4                  # lr = base_lr * global_batch / 256
    min_lr: NonNegFloat = 1e-6                # end of the cosine (mmengine: for every group; mae: x its lr_scale)
    betas: Betas = [0.9, 0.999]
    layer_decay: float_(gt=0, le=1) = 1.0     # 1 = off; fine-tune 0.65
    momentum: float_(ge=0, lt=1) = 0.9        # LARS
    trust_coeff: PosFloat = 0.001             # LARS eta
    lars_exclude_1d: Bool = False             # True = official MAE LARS (no trust ratio on biases); the LARS update
                                              # itself follows schedule.reference (eval.lars)


class EvalSchedule(ScheduleConfig):
    epochs: PosInt = 100
    warmup_epochs: NonNegFloat = 5.0


class EvalCheckpoint(CheckpointBase):
    every_epochs: NonNegInt = 1               # 0 = only at the end (and every_steps, if set)
    keep_last: int_(ge=1) = 2


class EvalRecipe(BaseRecipe):
    name: RunName = "finetune"
    task: Literal["finetune", "linprobe"] = "finetune"
    init: InitConfig = Field(default_factory=InitConfig)
    # ModelConfig fields (random init), or hints like num_heads; checked even when absent (a random encoder needs one)
    model: ModelSpec = Field(default_factory=dict, validate_default=True)
    data: EvalData = Field(default_factory=EvalData)
    augment: AugConfig = Field(default_factory=AugConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    batch: BatchConfig = Field(default_factory=lambda: BatchConfig(global_batch=1024, micro_batch=128))
    eval_batch: PosInt = 128
    optim: EvalOptim = Field(default_factory=EvalOptim)
    schedule: EvalSchedule = Field(default_factory=EvalSchedule)
    checkpoint: EvalCheckpoint = Field(default_factory=EvalCheckpoint)
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig(every_steps=50, image_every_steps=0))

    # Cross-section rules are field validators on the later field (pydantic validates in declaration order, the
    # shared sections first): info.data holds the earlier fields that passed, so a rule whose inputs were already
    # refused is skipped instead of reported twice.
    @field_validator("model")
    @classmethod
    def _random_encoder_needs_a_model(cls, model, info: ValidationInfo):
        init = info.data.get("init")
        if init is not None and init.checkpoint is None and not model:
            raise ValueError("a random encoder (no init.checkpoint) needs a model (an arch name or ModelConfig fields)")
        return model

    @field_validator("data")
    @classmethod
    def _paths_suit_the_source(cls, d):
        from mff_ds.data import SOURCES
        source = SOURCES.get(d.source)
        fail([(k, why) for k in ("train_path", "val_path") if (why := source.path_problem(getattr(d, k)))] +
             [(k, why) for k in ("train_index", "val_index") if (why := source.index_problem(getattr(d, k)))])
        return d

    @field_validator("task")
    @classmethod
    def _linprobe_trains_the_head(cls, task, info: ValidationInfo):
        o = info.data.get("optim")
        if task == "linprobe" and o is not None and o.name != "lars" and o.layer_decay != 1.0:
            raise problem(f"the linear probe trains only the head; expected 1.0, got {o.layer_decay}",
                          key="optim.layer_decay")
        return task

    @classmethod
    def micro_multiple(cls, data: dict) -> int:
        aug = data.get("augment") if isinstance(data.get("augment"), dict) else {}
        try:  # Mixup / CutMix pair the images of a micro batch
            return 2 if float(aug.get("mixup", 0)) > 0 or float(aug.get("cutmix", 0)) > 0 else 1
        except (TypeError, ValueError):  # the augment section reports it
            return 1

    def compat_dict(self) -> dict:
        """What a resumed run must share with its checkpoint."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("task", "seed", "precision", "init", "model", "augment", "head", "optim", "schedule")}
        if self.init.checkpoint is not None:  # the checkpoint fixes the encoder; only a num_heads hint is read
            keep["model"] = {k: v for k, v in d["model"].items() if k == "num_heads"}
        # the index keys bind, None included (checkpoint.migrate gives older markers None)
        keep["data"] = {k: v for k, v in d["data"].items() if k not in ("num_workers", "pin_memory")}
        keep["batch.global_batch"] = d["batch"]["global_batch"]
        return keep


def from_dict(tree: dict, world_size: Optional[int] = None, source: str = "recipe") -> EvalRecipe:
    return validate(EvalRecipe, tree, world_size, source)


def load_eval_recipe(path: Optional[str], overrides: Optional[List[str]] = None,
                     world_size: Optional[int] = None) -> EvalRecipe:
    """Read YAML `path` (None: defaults), apply `--set` overrides, validate (world size from the launcher)."""
    tree, source, by_hand = read_tree(path, overrides)
    return validate(EvalRecipe, tree, launcher_world_size() if world_size is None else world_size, source, by_hand)
