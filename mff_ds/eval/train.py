"""Fine-tune / linear probe: the classification task on the shared loop (mff_ds.engine.trainer.fit), and the
evaluation of a classifier file.

The loop gives it everything a training run needs (distributed start-up, the DeepSpeed config, the lr schedule of
the recipe's reference with per-group `lr_scale` = layer decay, checkpoints with exact mid-epoch resume, non-finite
checks, metrics, stop signals). The task adds: timm Mixup/CutMix + soft-target losses, LARS (eval.lars, the
reference's), evaluation (top-1/top-5) after every epoch and the best classifier kept as `best.safetensors`.

LARS computes one trust ratio per parameter, so the linear probe runs DeepSpeed in fp32 with ZeRO 0 (ZeRO and
DeepSpeed's 16-bit optimizers flatten parameters); on CUDA the frozen encoder still runs under bf16/fp16
autocast when the recipe's precision asks for it.
"""
import copy
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mff_ds.common import COMPUTE_DTYPES, UserError, write_json
from mff_ds.data import source_for_path
from mff_ds.engine import checkpoint as ckpt
from mff_ds.engine.distributed import device_for, init_distributed
from mff_ds.engine.metrics import MetricsLogger
from mff_ds.engine.optim import build_deepspeed_engine, build_ds_config, precision_of
from mff_ds.engine.recipe import RecipeError
from mff_ds.engine.trainer import Task, fit

from . import data as edata
from . import metrics
from . import models as emodels
from .lars import LARS
from .recipe import EvalRecipe


def _criterion(recipe: EvalRecipe, num_classes: int):
    """(mixup_fn or None, loss(logits, target)) as in the reference: Mixup/CutMix + soft-target CE with label
    smoothing, label-smoothing CE, or plain CE."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    a = recipe.augment
    if a.mixup > 0 or a.cutmix > 0:
        mix = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                    mode="batch", label_smoothing=a.smoothing, num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()
    if a.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(a.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def _average_bn_stats(module, world: int) -> None:
    """DeepSpeed does not broadcast buffers: average BatchNorm running statistics over ranks before evaluating
    and saving, so every rank evaluates (and the checkpoint keeps) the same probe."""
    if world > 1 and dist.is_initialized():
        for name, buf in module.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                dist.all_reduce(buf)
                buf.div_(world)


def _lars_groups(model, recipe: EvalRecipe) -> list:
    """Head weight with the trust ratio; head bias with it too (mmpretrain) unless lars_exclude_1d (MAE)."""
    o = recipe.optim
    groups = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = o.lars_exclude_1d and p.ndim <= 1
        groups.append({"params": [p], "name": n, "weight_decay": 0.0 if plain else o.weight_decay,
                       "lars_exclude": plain})
    return groups


# the LARS each schedule reference's linear probe uses (eval.lars): mmpretrain's config, or official MAE's
LARS_OF = {"mmengine": "mmpretrain", "mae": "mae"}


def _build_engine(model, recipe: EvalRecipe, ds_config: dict, device):
    """(engine, base optimizer): AdamW through engine.optim.build_deepspeed_engine, or LARS on the same engine."""
    o = recipe.optim
    peak = recipe.lr()
    if o.name == "adamw":
        if recipe.task == "finetune":
            groups = emodels.finetune_param_groups(model, o.weight_decay, o.layer_decay)
        else:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": o.weight_decay}]
        return build_deepspeed_engine(model, groups, ds_config, lr=peak, betas=o.betas, eps=o.eps, device=device)
    import deepspeed
    model.to(device)
    opt = LARS(_lars_groups(model, recipe), lr=peak, convention=LARS_OF[recipe.schedule.reference],
               momentum=o.momentum, weight_decay=o.weight_decay, trust_coeff=o.trust_coeff)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=copy.deepcopy(ds_config))
    return engine, opt


def _ds_config(recipe: EvalRecipe, world: int, device):
    """-> (DeepSpeed config, autocast dtype for the frozen encoder or None)."""
    cfg = build_ds_config(recipe, world, device)
    autocast = None
    if recipe.optim.name == "lars":
        p = precision_of(cfg)
        autocast = COMPUTE_DTYPES[p] if p != "fp32" and device.type == "cuda" else None
        cfg["fp16"], cfg["bf16"], cfg["torch_autocast"] = {"enabled": False}, {"enabled": False}, {"enabled": False}
        cfg.setdefault("zero_optimization", {})["stage"] = 0
    return cfg, autocast


@dataclass
class ClassifierOutput:
    loss: torch.Tensor
    logits: torch.Tensor


class ClassifyTask(Task):
    """Fine-tune or linear probe on the shared loop: timm augmentation and Mixup/CutMix, soft-target losses,
    layer decay or LARS, top-1/top-5 after every epoch, the best classifier kept as `best.safetensors`."""

    def __init__(self, recipe: EvalRecipe, quiet: bool = False):
        super().__init__(recipe)
        self.quiet = quiet
        self.best_top1, self.best_epoch, self.history = -1.0, -1, []
        self.encoder = None  # (weights, config) of init.checkpoint, from prepare() until build()
        self._prepared = None  # the (init.checkpoint, init.format) prepare() loaded

    def prepare(self, is_main):
        """The encoder of init.checkpoint: its architecture trains, each key the recipe says otherwise is named,
        and the recipe records it before the resume comparison."""
        r = self.recipe
        source = (r.init.checkpoint, r.init.format)
        if r.init.checkpoint is not None and source != self._prepared:  # (a random encoder: drawn in build())
            self._prepared = source
            self.encoder = emodels.load_encoder(r.init.checkpoint, r.init.format, r.model)
            cfg = self.encoder[1]
            ignored = emodels.checkpoint_wins(r.model, cfg)
            # every key the recipe's section has, with the checkpoint's value (a pretraining key such as
            # out_indices must still suit the checkpoint's depth when the recipe is checked again)
            r.model = dict({k: getattr(cfg, k) for k in r.model if k != "arch" and hasattr(cfg, k)},
                           **emodels.vit_kwargs(cfg))
            for line in ignored if is_main else ():
                print(f"{line} ({r.init.checkpoint}; docs/EVALUATION.md)", file=sys.stderr, flush=True)

    def ds_config(self, world, device):
        cfg, self.autocast = _ds_config(self.recipe, world, device)
        return cfg

    def build(self, run):
        """Encoder + head (identical on every rank) and the train / val loaders."""
        r = self.recipe
        encoder_sd, cfg = self.encoder or emodels.load_encoder(None, r.init.format, r.model)
        self.encoder = None  # the model holds the weights now; no second copy
        img_size = r.data.img_size or cfg.img_size
        train_loader, self.train_source = edata.build_train_loader(
            r.data, edata.train_transform(r.task, img_size, r.augment), micro_batch=run.plan.micro,
            rank=run.rank, world=run.world, seed=r.seed)
        self.val_loader, val = edata.build_val_loader(r.data, edata.val_transform(img_size, r.augment),
                                                      batch=r.eval_batch, rank=run.rank, world=run.world)
        classes = self.train_source.classes
        self.num_classes = _num_classes(r, classes, val.classes)
        for split, source in (("train", self.train_source), ("val", val)):  # before a step: not a device assert
            _labels_fit(source, self.num_classes, f"data.{split}_index" if getattr(r.data, f"{split}_index") else
                        f"data.{split}_path", "data.num_classes")
        self.classes, self.vit = classes, dict(emodels.vit_kwargs(cfg), img_size=img_size)
        if r.task == "finetune":
            model = emodels.build_finetune_model(encoder_sd, cfg, self.num_classes, r.head.drop_path,
                                                 r.head.init_std, img_size)
        else:
            model = emodels.build_linprobe_model(encoder_sd, cfg, self.num_classes, r.head.init_std, img_size)
            model.autocast_dtype = self.autocast
        self.device = run.device
        self.input_dtype = run.dtype if r.task == "finetune" else torch.float32  # LARS probes run in fp32
        return model, train_loader

    def build_engine(self, run, model):
        engine, optimizer = _build_engine(model, self.recipe, run.ds_config, run.device)
        self.mixup, self.criterion = _criterion(self.recipe, self.num_classes)  # draws from the per-rank RNG later
        return engine, optimizer

    def forward(self, engine, images, target):
        images = images.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        logits = engine(images.to(self.input_dtype))
        return ClassifierOutput(self.criterion(logits.float(), target), logits)

    def data_identity(self):
        return self.train_source.identity()

    def state_dict(self):
        return {"best_top1": self.best_top1, "best_epoch": self.best_epoch, "history": self.history}

    def load_state_dict(self, state):
        self.best_top1, self.best_epoch = state.get("best_top1", -1.0), state.get("best_epoch", -1)
        self.history = list(state.get("history", []))

    def end_epoch(self, run, epoch):
        """Evaluate; checkpoint every `checkpoint.every_epochs`, at the last epoch and at the run's last step;
        keep the best classifier (its fp32 weights from that checkpoint when there is one)."""
        r, engine = self.recipe, run.engine
        _average_bn_stats(engine.module, run.world)
        engine.eval()
        res = metrics.evaluate(lambda x: engine(x), self.val_loader, run.device, self.input_dtype)
        engine.train()
        res["epoch"] = epoch
        new_best = res["top1"] > self.best_top1
        if new_best:
            self.best_top1, self.best_epoch = res["top1"], epoch
        self.history.append(res)
        run.log(dict(res, best_top1=self.best_top1))
        run.say(f"epoch {epoch}: top1 {res['top1']:.2f}  top5 {res['top5']:.2f}  val_loss "
                f"{res['val_loss']:.4f}  (best {self.best_top1:.2f} @ epoch {self.best_epoch})")
        every, tag = r.checkpoint.every_epochs, None
        if (every and run.epoch % every == 0) or run.epoch == r.schedule.epochs or run.step == run.stop_step:
            tag = f"global_step{run.step}"
            run.save()
        if new_best and run.is_main:
            sd = (ckpt.fp32_state_dict(engine, run.ckpt_root, tag) if tag else
                  {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()})
            emodels.save_classifier(sd, self.best_path(run), r.task, self.vit, self.num_classes,
                                    {"epoch": epoch, "top1": res["top1"], "top5": res["top5"],
                                     "classes": self.classes, "recipe": r.name})

    def best_path(self, run):
        return os.path.join(run.output_dir, "best.safetensors")

    def finish(self, run, stopped_by):
        """results.json (best and last top-1/top-5, the per-epoch history) and the table."""
        last = self.history[-1] if self.history else {}
        best = next((h for h in self.history if h["epoch"] == self.best_epoch), {})
        best_path = self.best_path(run)
        summary = {"task": self.recipe.task, "step": run.step, "total_steps": run.total_steps,
                   "epochs_done": run.epoch, "best_top1": best.get("top1"), "best_top5": best.get("top5"),
                   "best_epoch": self.best_epoch, "last_top1": last.get("top1"), "last_top5": last.get("top5"),
                   "history": self.history, "best_path": best_path if os.path.exists(best_path) else None,
                   "output_dir": run.output_dir}
        if run.is_main:
            write_json(os.path.join(run.output_dir, "results.json"), summary)
            if not self.quiet and self.history:
                print(metrics.table([dict(h, name=f"epoch {h['epoch']}") for h in self.history],
                                    ("name", "top1", "top5", "val_loss")))
        return summary


def _num_classes(recipe: EvalRecipe, classes, val_classes) -> int:
    if classes and val_classes and classes != val_classes:
        raise UserError(f"data: train classes {classes[:5]}... and val classes {val_classes[:5]}... differ; "
                         f"expected the same class folders")
    n = recipe.data.num_classes or (len(classes) if classes else None)
    if n is None:
        raise RecipeError(["data.num_classes: expected the number of classes for shards and list files, got None"])
    if classes and n != len(classes):
        raise RecipeError([f"data.num_classes: the ImageFolder has {len(classes)} classes, got {n}"])
    return n


def _labels_fit(source, num_classes: int, key: str, classes_key: str) -> None:
    """Every label the source knows before reading its samples in [0, num_classes), or one line naming the first
    that is not."""
    why = source.label_problem(num_classes)
    if why:
        raise UserError(f"{key}: expected labels in [0, {num_classes}) ({classes_key}: {num_classes}), got {why}")


def run(recipe: EvalRecipe, output_dir: str, max_steps: Optional[int] = None, resume: str = "auto",
        quiet: bool = False) -> dict:
    """Train the classifier of `recipe` (continuing from a checkpoint under output_dir when resume='auto'),
    evaluating after every epoch; returns the summary written to results.json (the loop's entries too)."""
    return fit(ClassifyTask(recipe, quiet), output_dir, max_steps=max_steps, resume=resume)


def evaluate_checkpoint(path: str, val_path: str, *, img_size: Optional[int] = None, batch: int = 128,
                        crop_pct: float = 0.875, interpolation: str = "bicubic", num_workers: int = 4,
                        num_heads: Optional[int] = None, output_dir: Optional[str] = None) -> dict:
    """top-1 / top-5 of a classifier file (ours, mmpretrain or official MAE) on an ImageFolder or shards."""
    from .recipe import AugConfig, EvalData
    env = init_distributed(output_dir=output_dir)
    device = device_for(env.local_rank)
    model, meta = emodels.load_classifier(path, num_heads)
    model.to(device).eval()
    size = img_size or meta["vit"]["img_size"]
    if size != meta["vit"]["img_size"]:
        raise UserError(f"--img-size: the classifier was built for {meta['vit']['img_size']} px, got {size}")
    aug = AugConfig(val_crop_pct=crop_pct, val_interpolation=interpolation)
    d = EvalData(source=source_for_path(val_path), val_path=val_path, num_workers=num_workers)
    loader, source = edata.build_val_loader(d, edata.val_transform(size, aug), batch=batch, rank=env.rank,
                                            world=env.world_size)
    if source.classes and len(source.classes) != meta["num_classes"]:
        raise UserError(f"{val_path}: {len(source.classes)} class folders, the classifier has {meta['num_classes']} "
                        f"classes")
    _labels_fit(source, meta["num_classes"], "--val", "the classifier's classes")
    res = metrics.evaluate(model, loader, device)
    res.update(checkpoint=str(path), task=meta.get("task"))
    if output_dir and env.rank == 0:
        logger = MetricsLogger(output_dir, True, tensorboard=False)
        logger.log(0, res)
        logger.close()
    return res
