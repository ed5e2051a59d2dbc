"""Downstream recipes (fine-tune / linear probe): YAML + `--set a.b=c` overrides -> a validated `EvalRecipe`.

Same conventions as the pretraining recipe (mff_ds.engine.recipe): every problem is listed at once in a
`RecipeError`; the batch, deepspeed, checkpoint and logging sections are the pretraining ones, so
`engine.optim.build_ds_config` takes an EvalRecipe as it is.
"""
import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from mff_ds.engine.recipe import (BatchConfig, DeepSpeedSection, LoggingConfig, RecipeError, RecipeMethods, _build,
                                  launcher_world_size, read_tree, schedule_and_deepspeed_problems)


@dataclass
class InitConfig:
    checkpoint: Optional[str] = None          # pretrained weights; None = random encoder from `model`
    format: Literal["auto", "mff_ds", "mmpretrain", "mae"] = "auto"


@dataclass
class EvalData:
    source: str = "imagefolder"               # a mff_ds.data.SOURCES name that gives images (digits: the demo set)
    train_path: Optional[str] = None          # ImageFolder root or shard pattern
    val_path: Optional[str] = None
    train_samples: Optional[int] = None       # webdataset without _info.json
    val_samples: Optional[int] = None
    num_classes: Optional[int] = None         # None = number of ImageFolder classes
    img_size: Optional[int] = None            # None = the pretrained image size (else pos-embed resampled)
    num_workers: int = 8
    pin_memory: bool = True


@dataclass
class AugConfig:
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])   # RandomResizedCrop
    hflip: float = 0.5
    interpolation: str = "bicubic"
    auto_augment: Optional[str] = None        # fine-tune: rand-m9-mstd0.5-inc1
    reprob: float = 0.0                       # random erasing
    remode: str = "pixel"
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.0
    val_crop_pct: float = 0.875               # resize short side to size / 0.875 (256 for 224), center crop
    val_interpolation: str = "bicubic"


@dataclass
class HeadConfig:
    drop_path: float = 0.0
    init_std: float = 2e-5                    # trunc-normal std of the new Linear head (bias 0)


@dataclass
class EvalOptim:
    name: Literal["adamw", "lars"] = "adamw"
    base_lr: float = 5e-4                     # lr = base_lr * global_batch / 256
    min_lr: float = 1e-6                      # end of the cosine (times each group's layer-decay scale)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.05
    layer_decay: float = 1.0                  # 1 = off; fine-tune 0.65
    momentum: float = 0.9                     # LARS
    trust_coeff: float = 0.001                # LARS eta
    lars_exclude_1d: bool = False             # True = official MAE LARS (no trust ratio on biases)
    grad_clip: float = 0.0


@dataclass
class EvalSchedule:
    epochs: int = 100
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 1e-4


@dataclass
class EvalCheckpoint:
    every_epochs: int = 1
    keep_last: int = 2


@dataclass
class EvalRecipe(RecipeMethods):
    name: str = "finetune"
    task: Literal["finetune", "linprobe"] = "finetune"
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    init: InitConfig = field(default_factory=InitConfig)
    model: Dict[str, Any] = field(default_factory=dict)   # ModelConfig fields (random init, or hints like num_heads)
    data: EvalData = field(default_factory=EvalData)
    augment: AugConfig = field(default_factory=AugConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(global_batch=1024, micro_batch=128))
    eval_batch: int = 128
    optim: EvalOptim = field(default_factory=EvalOptim)
    schedule: EvalSchedule = field(default_factory=EvalSchedule)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: EvalCheckpoint = field(default_factory=EvalCheckpoint)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(every_steps=50, image_every_steps=0))

    def compat_dict(self) -> dict:
        """What a resumed run must share with its checkpoint."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("task", "seed", "precision", "init", "model", "augment", "head", "optim", "schedule")}
        keep["data"] = {k: v for k, v in d["data"].items() if k not in ("num_workers", "pin_memory")}
        keep["batch.global_batch"] = d["batch"]["global_batch"]
        return keep



def check(r: EvalRecipe, world_size: Optional[int] = None) -> List[str]:
    """Semantic checks; returns every problem as 'key: expected ..., got ...'."""
    p = []
    if not r.name or "/" in r.name:
        p.append(f"name: expected a non-empty name without '/', got {r.name!r}")
    d = r.data
    from mff_ds.data import SOURCES  # here: it imports torch, which the recipe modules do not at import
    images = [name for name in SOURCES.names() if not SOURCES.get(name).ready]  # evaluation transforms images
    if d.source not in images:
        p.append(f"data.source: expected one of {images}, got {d.source!r}")
    else:
        for k in ("train_path", "val_path"):
            why = SOURCES.get(d.source).path_problem(getattr(d, k))
            if why:
                p.append(f"data.{k}: {why}")
    if d.num_classes is not None and d.num_classes < 2:
        p.append(f"data.num_classes: expected >= 2 or null, got {d.num_classes}")
    if d.img_size is not None and d.img_size <= 0:
        p.append(f"data.img_size: expected a positive integer or null, got {d.img_size}")
    if d.num_workers < 0:
        p.append(f"data.num_workers: expected >= 0, got {d.num_workers}")
    b = r.batch
    for k in ("global_batch", "micro_batch"):
        if getattr(b, k) <= 0:
            p.append(f"batch.{k}: expected a positive integer, got {getattr(b, k)}")
    if world_size and b.global_batch > 0 and b.micro_batch > 0 and b.global_batch % (b.micro_batch * world_size):
        p.append(f"batch.global_batch: {b.global_batch} cannot be formed from micro_batch {b.micro_batch} x world "
                 f"size {world_size}; expected a multiple of {b.micro_batch * world_size}")
    if r.eval_batch <= 0:
        p.append(f"eval_batch: expected a positive integer, got {r.eval_batch}")
    a = r.augment
    if len(a.crop_scale) != 2 or not 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1:
        p.append(f"augment.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {a.crop_scale}")
    for k in ("hflip", "reprob", "mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(a, k) <= 1:
            p.append(f"augment.{k}: expected a probability in [0, 1], got {getattr(a, k)}")
    for k in ("mixup", "cutmix"):
        if getattr(a, k) < 0:
            p.append(f"augment.{k}: expected alpha >= 0 (0 = off), got {getattr(a, k)}")
    if not 0 <= a.smoothing < 1:
        p.append(f"augment.smoothing: expected in [0, 1), got {a.smoothing}")
    if (a.mixup > 0 or a.cutmix > 0) and b.micro_batch % 2:
        p.append(f"batch.micro_batch: Mixup/CutMix pair images within a batch; expected an even number, got {b.micro_batch}")
    if not 0 < a.val_crop_pct <= 1:
        p.append(f"augment.val_crop_pct: expected in (0, 1], got {a.val_crop_pct}")
    if not 0 <= r.head.drop_path < 1:
        p.append(f"head.drop_path: expected in [0, 1), got {r.head.drop_path}")
    if r.head.init_std <= 0:
        p.append(f"head.init_std: expected > 0, got {r.head.init_std}")
    o = r.optim
    if r.task == "linprobe" and o.name != "lars" and o.layer_decay != 1.0:
        p.append(f"optim.layer_decay: the linear probe trains only the head; expected 1.0, got {o.layer_decay}")
    if o.base_lr <= 0:
        p.append(f"optim.base_lr: expected > 0, got {o.base_lr}")
    if o.min_lr < 0:
        p.append(f"optim.min_lr: expected >= 0, got {o.min_lr}")
    if len(o.betas) != 2 or not all(0 <= x < 1 for x in o.betas):
        p.append(f"optim.betas: expected two numbers in [0, 1), got {o.betas}")
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay: expected >= 0, got {o.weight_decay}")
    if not 0 < o.layer_decay <= 1:
        p.append(f"optim.layer_decay: expected in (0, 1] (1 = off), got {o.layer_decay}")
    if o.grad_clip < 0:
        p.append(f"optim.grad_clip: expected >= 0 (0 = off), got {o.grad_clip}")
    p += schedule_and_deepspeed_problems(r.schedule, r.deepspeed)
    if r.checkpoint.every_epochs < 0:
        p.append(f"checkpoint.every_epochs: expected >= 0 (0 = only at the end), got {r.checkpoint.every_epochs}")
    if r.checkpoint.keep_last < 1:
        p.append(f"checkpoint.keep_last: expected >= 1, got {r.checkpoint.keep_last}")
    if r.logging.every_steps < 1:
        p.append(f"logging.every_steps: expected >= 1, got {r.logging.every_steps}")
    if r.init.checkpoint is not None and not os.path.exists(r.init.checkpoint):
        p.append(f"init.checkpoint: expected an existing file, got {r.init.checkpoint!r}")
    if r.init.checkpoint is None and not r.model:
        p.append("model: a random encoder (no init.checkpoint) needs a model (an arch name or ModelConfig fields)")
    return p


def from_dict(tree: dict, world_size: Optional[int] = None, source: str = "recipe") -> EvalRecipe:
    problems: List[str] = []
    recipe = _build(EvalRecipe, copy.deepcopy(tree or {}), "", problems)
    if not problems:
        problems = check(recipe, world_size)
    if problems:
        raise RecipeError(problems, source)
    return recipe


def load_eval_recipe(path: Optional[str], overrides: Optional[List[str]] = None,
                     world_size: Optional[int] = None) -> EvalRecipe:
    """Read YAML `path` (None: defaults), apply `--set` overrides, validate (world size from the launcher)."""
    tree, source = read_tree(path, overrides)
    return from_dict(tree, launcher_world_size() if world_size is None else world_size, source)
